"""The desktop client: a plain tkinter/ttk window over the service (research use only, not a diagnosis).

`client` talks to a server over HTTP (httpx) or runs the core in-process (`inference.runner`), `report`
lays out the core's summary and renders the PNG report, `app` owns the window and `cli` is `bfd desktop`.
May import: the core, `clients.http`, httpx, Pillow, tkinter. Never: the HTTP service or its framework,
TensorFlow.
"""
