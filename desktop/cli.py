"""`bfd desktop`: the window, over a running server (`--url`) or the service run in-process (`--bundle`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--bundle", type=Path, default=Path("models/demo"), help="run the service in-process on this")
    target.add_argument("--url", help="ask this server instead, e.g. http://127.0.0.1:8000")
    parser.add_argument("--image", type=Path, help="open this image at start")
    parser.add_argument("--api-key", help="for a server that requires one (default: $BFD_API_KEY)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per request, with --url")


def run(args: argparse.Namespace) -> int:
    import os
    import tkinter as tk

    from desktop.app import DesktopApp
    from desktop.client import HttpClient, InProcessClient, PredictionClient

    try:
        root = tk.Tk()
    except tk.TclError as error:  # no display: say so instead of a traceback
        print(f"error: cannot open a window ({error}); is DISPLAY set?", file=sys.stderr)
        return 2

    def make_client() -> PredictionClient:
        if args.url:
            return HttpClient(args.url, timeout_s=args.timeout_s, api_key=args.api_key or os.environ.get("BFD_API_KEY"))
        return InProcessClient(args.bundle)

    app = DesktopApp(root, make_client)
    try:
        if args.image:
            app.open_image(args.image)
        root.mainloop()
    finally:
        app.close()  # closing the window already did; after Ctrl-C this stops the service
    return 0
