"""The desktop client: a plain tkinter/ttk window over the service (research use only, not a diagnosis).

`client` talks to a server or runs the service in-process, `report` renders the PNG report, `app` owns the
window and `cli` is `bfd desktop`. Nothing here imports TensorFlow.
"""
