"""Clients of the system that are not the HTTP service: `bfd predict`, and what talks to a running server.

`predict_cli` runs images in-process through the core (`inference.runner`) or posts them to a server;
`http` holds what every HTTP client of the API shares (reading an error answer). May import the core, httpx
and the standard library; never the HTTP service itself (`service`) nor its web framework.
"""
