"""The core: decode, route and answer, for every door (HTTP, the DICOM node, the desktop, the CLI).

Owns the input contract and decoding (PNG, JPEG, DICOM: `preprocessing`, `decode_plan`, `dicom`,
`codec_pool`, `decoding`; GIL-holding work in worker processes: `worker_pool`), the bundle loader (`bundle`),
the onnxruntime engine (`engine`, `providers`), routing then specialist (`pipeline`), heatmaps (`heatmap`),
answers (labels, operating points, abstention, the study rule and the summary text: `answers`, `results`),
the generic batcher and admission (`batching`, `service_rate`, `memory_budget`), retry back-off for every
door (`backoff`), the predictor that ties them
(`predictor`, `config`, `events`, `runner`), DICOM outputs: the result objects of a study built with highdicom
(`dicom_objects`: the TID 1500 SR, a GSPS and a Secondary Capture per image, in the source study) and the
one-image Secondary Capture (`dicom_output`), de-identification (`deidentify`), and its own errors (`errors`).

May import: the standard library, numpy, Pillow, pydicom and its pixel plugins, highdicom, pydantic,
onnxruntime.
Never: FastAPI, Starlette, SQLAlchemy, prometheus_client, TensorFlow, nor any of `service`, `training`,
`export`, `desktop`, `loadtest` (tests/test_import_boundaries.py checks all of this). `batching`,
`service_rate`, `memory_budget`, `worker_pool` and `backoff` import only the standard library.
"""
