"""Training and evaluation: datasets (MURA, flat folders, FracAtlas), patient or image splits, cached backbone
features, the heads, operating points, and `bfd evaluate`'s clinical metrics and external validation.

Keras is imported only where models are built or trained (`architecture`, `features`, `heads`, `run`);
reading data, splitting and evaluating need no TensorFlow (evaluation runs the ONNX bundle through the core).
May import: the core (`inference`), TensorFlow where said, numpy, matplotlib, tqdm.
Never: the HTTP service (`service`), `clients`, `desktop`, `loadtest`.
"""
