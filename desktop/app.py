"""The window: open a radiograph, ask the service, show its answer, heatmap and warnings, save a report.

Tk is single-threaded, and a prediction can take seconds (the real ResNet50 bundle on CPU), so every call to
the client (its start-up too: an in-process client loads and warms the bundle) runs on one worker thread.
The worker never touches Tk: it hands finished futures to a queue that the Tk thread drains from `after`,
so answers are applied on the Tk thread. Errors land in the window as text, never as a traceback.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import io
import logging
import queue
import time
import tkinter as tk
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from tkinter import filedialog, ttk
from typing import Any

from PIL import Image

from desktop.client import ClientError, PredictionClient
from desktop.report import PreviewError, describe, fit, load_image, overlay_image, save_report
from inference.results import DISCLAIMER

log = logging.getLogger(__name__)

TITLE = "Bone-Fracture-Detection (research use only)"
PREVIEW_SIZE = 560
WRAP = 470
ERROR_COLOUR = "#b00020"
OPEN_TYPES = [
    ("Radiographs", "*.png *.jpg *.jpeg *.dcm *.dicom"),
    ("PNG", "*.png"),
    ("JPEG", "*.jpg *.jpeg"),
    ("DICOM", "*.dcm *.dicom"),
    ("All files", "*"),
]
RESULT_FIELDS = ("body_part", "fracture", "probabilities", "flags", "abstention", "model", "warnings")

ClientSource = PredictionClient | Callable[[], PredictionClient]
_Failed = Callable[[BaseException], None]
_Done = tuple[Future[Any], Callable[[Any], None], _Failed]


class DesktopApp:
    """One window over one client. Methods the buttons call are public, so tests drive it without dialogs."""

    def __init__(self, root: tk.Tk, client: ClientSource, *, poll_ms: int = 40) -> None:
        self.root = root
        self.poll_ms = poll_ms
        self.client: PredictionClient | None = None
        self._start_error: str | None = None
        self.image_path: Path | None = None
        self.prediction: dict[str, Any] | None = None
        self._original: Image.Image | None = None
        self._overlay: Image.Image | None = None
        self._photo: tk.PhotoImage | None = None  # Tk forgets an image nobody in Python holds
        self._generation = 0  # bumped when a new image opens: answers for an older one are dropped
        self._pending = 0
        self._done: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bfd-desktop")
        self._closed = False
        self._build()
        self._poll_id: str | None = self.root.after(self.poll_ms, self._poll)
        self.root.protocol("WM_DELETE_WINDOW", self.close)
        self._start(client)

    # --- widgets -------------------------------------------------------------------------------------------

    def _build(self) -> None:
        root = self.root
        root.title(TITLE)
        root.geometry("1100x780")
        root.minsize(800, 600)
        root.columnconfigure(0, weight=1)
        root.rowconfigure(2, weight=1)

        bar = ttk.Frame(root, padding=(8, 8, 8, 4))
        bar.grid(row=0, column=0, sticky="ew")
        self.open_button = ttk.Button(bar, text="Open image…", command=self.ask_open)
        self.predict_button = ttk.Button(bar, text="Predict", command=self.predict, state="disabled")
        self.show_heatmap = tk.BooleanVar(master=root, value=True)
        self.heatmap_toggle = ttk.Checkbutton(
            bar, text="Show heatmap overlay", variable=self.show_heatmap, command=self._show_preview, state="disabled"
        )
        self.save_button = ttk.Button(bar, text="Save report…", command=self.ask_save, state="disabled")
        for column, widget in enumerate((self.open_button, self.predict_button, self.heatmap_toggle, self.save_button)):
            widget.grid(row=0, column=column, padx=(0, 8))

        self.untrained_banner = tk.Label(
            root, text="", bg=ERROR_COLOUR, fg="white", font=("TkDefaultFont", 11, "bold"), wraplength=1060, pady=4
        )
        self.untrained_banner.grid(row=1, column=0, sticky="ew", padx=8)
        self.untrained_banner.grid_remove()  # shown once the model is known to be untrained

        body = ttk.Frame(root, padding=8)
        body.grid(row=2, column=0, sticky="nsew")
        body.columnconfigure(1, weight=1)
        body.rowconfigure(0, weight=1)
        frame = tk.Frame(body, width=PREVIEW_SIZE, height=PREVIEW_SIZE, bg="#222222")
        frame.grid(row=0, column=0, sticky="nw")
        frame.grid_propagate(False)  # a fixed box in pixels, whatever the picture
        frame.columnconfigure(0, weight=1)
        frame.rowconfigure(0, weight=1)
        self.preview = tk.Label(
            frame, text="Open a PNG, JPEG or DICOM radiograph", bg="#222222", fg="#dddddd", wraplength=PREVIEW_SIZE - 40
        )
        self.preview.grid(row=0, column=0, sticky="nsew")

        results = ttk.Frame(body, padding=(12, 0, 0, 0))
        results.grid(row=0, column=1, sticky="nsew")
        self.file_label = ttk.Label(results, text="No image", font=("TkDefaultFont", 11, "bold"), wraplength=WRAP)
        self.file_label.grid(row=0, column=0, sticky="w", pady=(0, 8))
        self.result_labels: dict[str, ttk.Label] = {}
        for row, name in enumerate(RESULT_FIELDS, start=1):
            label = ttk.Label(results, text="", wraplength=WRAP, justify="left")
            label.grid(row=row, column=0, sticky="w", pady=2)
            self.result_labels[name] = label
        self.result_labels["fracture"].configure(font=("TkDefaultFont", 12, "bold"))
        self.error_label = tk.Label(results, text="", fg=ERROR_COLOUR, wraplength=WRAP, justify="left", anchor="w")
        self.error_label.grid(row=len(RESULT_FIELDS) + 1, column=0, sticky="w", pady=(12, 0))

        self.disclaimer_label = tk.Label(
            root, text=DISCLAIMER, fg=ERROR_COLOUR, font=("TkDefaultFont", 10, "bold"), wraplength=1060
        )
        self.disclaimer_label.grid(row=3, column=0, sticky="ew", padx=8, pady=(0, 4))
        self.status_label = ttk.Label(root, text="", relief="sunken", anchor="w", padding=(6, 2))
        self.status_label.grid(row=4, column=0, sticky="ew")

    # --- what the window shows -----------------------------------------------------------------------------

    def shown(self) -> dict[str, str]:
        """Every text the window shows now, by name (and which picture: 'overlay', 'image' or 'none')."""
        texts = {name: str(label.cget("text")) for name, label in self.result_labels.items()}
        texts.update(
            title=self.root.title(),
            file=str(self.file_label.cget("text")),
            untrained=str(self.untrained_banner.cget("text")) if self.untrained_banner.winfo_ismapped() else "",
            disclaimer=str(self.disclaimer_label.cget("text")),
            error=str(self.error_label.cget("text")),
            status=str(self.status_label.cget("text")),
            picture=self.showing,
        )
        return texts

    @property
    def showing(self) -> str:
        """Which picture the preview holds."""
        if self._photo is None:
            return "none"
        return "overlay" if self._overlay is not None and self.show_heatmap.get() else "image"

    @property
    def busy(self) -> bool:
        return self._pending > 0

    def _set_status(self, text: str) -> None:
        self.status_label.configure(text=text)

    def _show_error(self, text: str) -> None:
        self.error_label.configure(text=text)
        self._set_status("Error")

    def _set_untrained(self, untrained_text: str | None) -> None:
        if untrained_text:
            self.untrained_banner.configure(text=untrained_text)
            self.untrained_banner.grid()
        else:
            self.untrained_banner.configure(text="")
            self.untrained_banner.grid_remove()

    def _show_preview(self) -> None:
        picture = self._overlay if self._overlay is not None and self.show_heatmap.get() else self._original
        if picture is None:
            self._photo = None
            self.preview.configure(image="")
            return
        buffer = io.BytesIO()
        fit(picture, PREVIEW_SIZE, PREVIEW_SIZE).save(buffer, format="PNG")
        # Tk 8.6 reads PNG itself: no Pillow-Tk binary bridge needed.
        self._photo = tk.PhotoImage(master=self.root, data=base64.b64encode(buffer.getvalue()).decode("ascii"))
        self.preview.configure(image=self._photo, text="")

    def _clear_result(self) -> None:
        self.prediction = None
        self._overlay = None
        for label in self.result_labels.values():
            label.configure(text="")
        self.error_label.configure(text="")
        self.heatmap_toggle.configure(state="disabled")
        self.save_button.configure(state="disabled")

    # --- actions -------------------------------------------------------------------------------------------

    def ask_open(self) -> None:
        name = filedialog.askopenfilename(parent=self.root, title="Open a radiograph", filetypes=OPEN_TYPES)
        if name:
            self.open_image(Path(name))

    def open_image(self, path: Path) -> None:
        """Show `path` and forget the previous answer. A file Pillow cannot show may still be sent: the
        server then says why it cannot read it."""
        self._generation += 1
        self._clear_result()
        self.image_path = Path(path)
        self.file_label.configure(text=self.image_path.name)
        try:
            self._original = load_image(self.image_path)
            self.preview.configure(text="")
        except PreviewError as error:
            self._original = None
            self.preview.configure(text=f"No preview: {error}")
        self._show_preview()
        self.predict_button.configure(state="normal" if self.client is not None or self.busy else "disabled")
        self._set_status(f"Opened {self.image_path}")

    def predict(self) -> None:
        """Ask the client on the worker thread; the answer (or the reason) is applied on the Tk thread."""
        if self.image_path is None:
            self._show_error("Open an image first.")
            return
        path, generation = self.image_path, self._generation
        self.error_label.configure(text="")
        self.predict_button.configure(state="disabled")
        self._set_status(f"Predicting {path.name}…")

        def job() -> dict[str, Any]:
            if self.client is None:
                raise ClientError(f"no service to ask: {self._start_error or 'it has not started'}")
            return self.client.predict(path, heatmap=True)

        def done(prediction: dict[str, Any]) -> None:
            if generation == self._generation:
                self._apply(prediction)

        def failed(error: BaseException) -> None:
            if generation == self._generation:
                self._show_error(_reason(error))

        self._submit(job, done, failed)

    def _apply(self, prediction: dict[str, Any]) -> None:
        self.prediction = prediction
        description = describe(prediction)
        texts = {
            "body_part": description.body_part,
            "fracture": description.fracture,
            "probabilities": description.probabilities,
            "flags": description.flags,
            "abstention": description.abstention,
            "model": description.model,
            "warnings": "\n".join(f"Warning: {w}" for w in description.warnings),
        }
        for name, text in texts.items():
            self.result_labels[name].configure(text=text)
        self.result_labels["abstention"].configure(foreground=ERROR_COLOUR if prediction.get("abstained") else "")
        self._set_untrained(description.untrained)
        self.disclaimer_label.configure(text=description.disclaimer)
        self._overlay = overlay_image(prediction)
        self.heatmap_toggle.configure(state="normal" if self._overlay is not None else "disabled")
        self.save_button.configure(state="normal")
        self._show_preview()
        self._set_status(f"Answered: {prediction.get('image_name', '')}")

    def toggle_heatmap(self) -> str:
        """Flip between the overlay and the original; returns what is shown now."""
        self.heatmap_toggle.invoke()
        return self.showing

    def ask_save(self) -> None:
        stem = self.image_path.stem if self.image_path else "report"
        name = filedialog.asksaveasfilename(
            parent=self.root,
            title="Save report",
            defaultextension=".png",
            initialfile=f"{stem}-bfd-report.png",
            filetypes=[("PNG", "*.png")],
        )
        if name:
            self.save_report(Path(name))

    def save_report(self, path: Path) -> Path | None:
        """Write the PNG report of the answer shown; None (and the reason in the window) when there is none."""
        if self.prediction is None or self.image_path is None:
            self._show_error("Nothing to save: predict first.")
            return None
        try:
            written = save_report(self.prediction, self.image_path, Path(path))
        except OSError as error:
            self._show_error(f"Cannot save the report to {path}: {error.strerror or error}")
            return None
        self._set_status(f"Report saved to {written}")
        return written

    # --- the worker and the Tk thread ----------------------------------------------------------------------

    def _start(self, client: ClientSource) -> None:
        """Make the client on the worker (an in-process one loads the bundle: seconds), then ask its model."""
        if isinstance(client, PredictionClient):
            self.client = client
            return
        self._set_status("Starting the service…")

        def make() -> PredictionClient:
            # Set here, on the worker, so a predict queued behind the start-up finds it.
            self.client = client()
            return self.client

        def started(made: PredictionClient) -> None:
            self._set_status(f"Ready: {made!r}")
            if self.image_path is not None and not self.busy:
                self.predict_button.configure(state="normal")

        def failed(error: BaseException) -> None:
            self._start_error = _reason(error)
            self._show_error(f"Cannot start the service: {self._start_error}")

        self._submit(make, started, failed)

    def _submit(
        self, job: Callable[[], Any], done: Callable[[Any], None], failed: Callable[[BaseException], None]
    ) -> None:
        self._pending += 1
        future = self._executor.submit(job)
        future.add_done_callback(lambda f: self._done.put((f, done, failed)))  # worker side: queue only

    def _poll(self) -> None:
        """On the Tk thread: apply every finished job."""
        while True:
            try:
                future, done, failed = self._done.get_nowait()
            except queue.Empty:
                break
            self._pending -= 1
            try:
                error = future.exception()
                if error is None:
                    done(future.result())
                else:
                    if not isinstance(error, ClientError):
                        log.error("desktop job failed", exc_info=error)
                    failed(error)
            except Exception as error:  # a bug in applying an answer: say so in the window, keep running
                log.exception("applying an answer failed")
                self._show_error(_reason(error))
            if self._pending == 0 and self.image_path is not None and self.client is not None:
                self.predict_button.configure(state="normal")
        self._poll_id = None if self._closed else self.root.after(self.poll_ms, self._poll)

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Pump the Tk loop until every job's answer is applied; False when `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.root.update()
            if self._pending == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def close(self) -> None:
        """Stop the worker, close the client on it (where it was made), then the window."""
        if self._closed:
            return
        self._closed = True
        if self._poll_id is not None:
            with contextlib.suppress(tk.TclError):
                self.root.after_cancel(self._poll_id)
        client = self.client
        if client is not None:
            try:
                self._executor.submit(client.close).result(timeout=60)
            except Exception:
                log.exception("closing the client failed")
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._photo = None  # its __del__ calls Tcl: let it run here, on the Tk thread
        with contextlib.suppress(tk.TclError):  # already gone when the mainloop ended without us
            self.root.destroy()
        # A failed job's future and its traceback form a cycle that holds this app, hence the Tk interpreter.
        # Collect such cycles now, on the Tk thread: a collection on another thread that frees a Tcl
        # interpreter aborts the process (Tcl objects belong to the thread that made them).
        gc.collect()


def _reason(error: BaseException) -> str:
    """A sentence for the window: the server's detail, else the exception's message."""
    if isinstance(error, ClientError):
        if error.status:
            return f"{error.detail} (HTTP {error.status})"
        return f"{error.detail} ({error.kind})" if error.kind else error.detail
    return f"{type(error).__name__}: {error}"
