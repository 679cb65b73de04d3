"""The DICOM node: a door onto the core for PACS traffic (DIMSE and DICOMweb).

Owns the storage SCP (`scp`), what it takes (`scope`), grouping instances into studies (`studies`), a study
through the core and its result objects (`analysis`, on `inference.dicom_objects`), the outbox contract
(`outbox`; the service's results store implements it), delivery by C-STORE or STOW-RS (`delivery`, `sender`),
STOW-RS request parsing (`stow`), the audit log (`audit`), the spool of received instances (`spool`), the
hooks it reports through (`events`), its configuration (`config`) and `node`, which ties them on the service's
Predictor.

May import: the core (`inference`), pydicom, pynetdicom, highdicom (through the core), dicomweb-client,
python-multipart, the standard library. Never: FastAPI, Starlette, SQLAlchemy, TensorFlow, nor `service`,
`training`, `export`, `desktop`, `clients`, `loadtest` (tests/test_import_boundaries.py).
"""
