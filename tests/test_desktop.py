"""The desktop window under a real X server (Xvfb), on the real service in-process and over real HTTP.

The window is driven through the methods its buttons call (no dialogs); what it shows is compared with what
POST /v1/predict answers for the same file on the same tiny bundle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

try:
    import tkinter  # the window needs Tk; some minimal Pythons are built without it
except ImportError as missing:  # pragma: no cover - depends on the interpreter build
    if os.environ.get("BFD_REQUIRE_DISPLAY") == "1":
        raise
    pytest.skip(
        f"!!! this Python has no tkinter ({missing}): the desktop tests did NOT run !!!", allow_module_level=True
    )
from factories import DEFAULT_PARTS, build_tiny_bundle, serving
from PIL import Image, ImageGrab

from desktop import cli as desktop_cli
from desktop.app import TITLE, DesktopApp
from desktop.client import ClientError, HttpClient, InProcessClient
from desktop.report import describe, save_report
from inference.answers import summarise
from inference.results import DISCLAIMER, ImagePrediction
from loadtest.servers import bfd_serve, free_port

pytestmark = pytest.mark.slow

# FracAtlas (Abedeen et al., Scientific Data 10, 521 (2023)), CC BY 4.0: see tests/data/xray/README.md
HAND = Path(__file__).parent / "data" / "xray" / "hand" / "fractured" / "fracatlas_IMG0003396.jpg"
ARTIFACTS = Path(__file__).parent / "artifacts"


# --- the X server, the bundle and the reference answers ----------------------------------------------------


@pytest.fixture(scope="module")
def display(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Xvfb; Xvfb picks a free display number itself and writes it to -displayfd."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        reason = "!!! Xvfb is not installed: the desktop window tests did NOT run (apt-get install -y xvfb) !!!"
        if os.environ.get("BFD_REQUIRE_DISPLAY") == "1":
            pytest.fail(reason + " and BFD_REQUIRE_DISPLAY=1")
        pytest.skip(reason)
    read_end, write_end = os.pipe()
    log = tmp_path_factory.mktemp("xvfb") / "xvfb.log"  # a file, not a pipe nobody drains
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [xvfb, "-displayfd", str(write_end), "-screen", "0", "1280x900x24", "-nolisten", "tcp"],
            pass_fds=(write_end,),
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    os.close(write_end)
    try:
        with os.fdopen(read_end) as numbers:
            number = numbers.readline().strip()  # EOF (empty) when Xvfb died before choosing
        if not number:
            pytest.fail(f"Xvfb did not start: {log.read_text(errors='replace')[-2000:]}")
        yield f":{number}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("desktop") / "tiny")


async def _post(bundle: Path, name: str, data: bytes, content_type: str) -> httpx.Response:
    async with serving(bundle) as (_, client):
        return await client.post("/v1/predict?heatmap=true", files={"file": (name, data, content_type)})


def service_answer(bundle: Path, name: str, data: bytes, content_type: str) -> httpx.Response:
    """What POST /v1/predict answers on `bundle` (the app over ASGI: not the desktop's own client)."""
    return asyncio.run(_post(bundle, name, data, content_type))


@pytest.fixture(scope="module")
def expected(bundle: Path) -> dict[str, Any]:
    response = service_answer(bundle, HAND.name, HAND.read_bytes(), "image/jpeg")
    assert response.status_code == 200, response.text
    prediction: dict[str, Any] = response.json()["predictions"][0]
    return prediction


def make_app(display: str, client: Any) -> DesktopApp:
    return DesktopApp(tkinter.Tk(screenName=display), client)


@pytest.fixture(scope="module")
def non_image(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A text file and the reason POST /v1/predict gives for refusing it."""
    notes = tmp_path_factory.mktemp("non-image") / "notes.txt"
    notes.write_text("these are notes, not a radiograph\n" * 20)
    refusal = service_answer(bundle, notes.name, notes.read_bytes(), "application/octet-stream")
    assert refusal.status_code == 422, refusal.text
    return notes, str(refusal.json()["detail"])


@pytest.fixture
def app(display: str, bundle: Path) -> Iterator[DesktopApp]:
    """A window on the in-process service, started (the reference answers are taken before: one lifespan at
    a time, as Alembic's migration context is process-global)."""
    window = make_app(display, lambda: InProcessClient(bundle))
    assert window.wait_idle(60), "the in-process service did not start in 60 s"
    assert window.shown()["error"] == ""
    yield window
    window.close()


def screenshot(window: DesktopApp, display: str) -> Image.Image:
    """The window's pixels from the X server (no window manager: no decorations)."""
    root = window.root
    for _ in range(5):
        root.update()
        time.sleep(0.05)
    x, y = root.winfo_rootx(), root.winfo_rooty()
    return ImageGrab.grab(bbox=(x, y, x + root.winfo_width(), y + root.winfo_height()), xdisplay=display)


# --- the window ----------------------------------------------------------------------------------------------


def test_window_shows_the_services_answer_heatmap_and_report(
    expected: dict[str, Any], app: DesktopApp, display: str, tmp_path: Path
) -> None:
    assert app.root.title() == TITLE == "Bone-Fracture-Detection (research use only)"
    assert app.shown()["disclaimer"] == DISCLAIMER  # before any answer too
    app.open_image(HAND)
    assert app.shown()["picture"] == "image"

    app.predict_button.invoke()
    assert app.busy  # the answer comes from the worker thread, not during the click
    assert app.wait_idle(120), "no answer in 120 s"

    shown = app.shown()
    assert shown["error"] == ""
    part = shown["body_part"].removeprefix("Body part: ").split(" ")[0]
    assert part in DEFAULT_PARTS
    assert part == expected["body_part"]["label"]
    assert f"P(fractured) = {expected['fracture']['probability']:.3f}" in shown["fracture"]
    assert f"threshold {expected['fracture']['threshold']:.3f}" in shown["fracture"]
    # an untrained bundle's label is undecided in words (inference.answers.summarise), whatever P says
    assert shown["fracture"].lower().startswith("fracture: undecided (untrained model) ")
    assert all(name in shown["probabilities"] for name in DEFAULT_PARTS)
    assert "UNTRAINED MODEL" in shown["untrained"]
    assert "untrained" in shown["model"]
    assert shown["disclaimer"] == DISCLAIMER
    assert shown["file"] == HAND.name

    assert expected["heatmap"]["overlay_png_base64"]
    assert shown["picture"] == "overlay"
    assert app.toggle_heatmap() == "image"
    assert app.toggle_heatmap() == "overlay"

    shot = screenshot(app, display)
    assert shot.size[0] > 600
    assert sum(1 for count in shot.convert("L").histogram() if count) > 20  # drawn, not a blank rectangle
    ARTIFACTS.mkdir(exist_ok=True)
    shot.save(ARTIFACTS / "desktop.png")

    written = app.save_report(tmp_path / "report.png")
    assert written == tmp_path / "report.png"
    with Image.open(written) as report:
        report.verify()
    with Image.open(written) as report, Image.open(HAND) as source:
        assert report.format == "PNG"
        assert report.width >= source.width
        assert report.height > source.height
    assert "Report saved" in app.shown()["status"]


def test_window_shows_the_servers_reason_for_a_non_image(
    non_image: tuple[Path, str], app: DesktopApp, tmp_path: Path
) -> None:
    notes, detail = non_image
    app.open_image(notes)
    assert app.shown()["picture"] == "none"
    assert "No preview" in str(app.preview.cget("text"))
    app.predict()
    assert app.wait_idle(120)
    shown = app.shown()
    assert detail in shown["error"]
    assert "(undecodable image)" in shown["error"]  # in-process: the core's own kind of refusal, no HTTP status
    assert "Traceback" not in shown["error"]
    assert shown["fracture"] == ""
    assert shown["disclaimer"] == DISCLAIMER
    assert app.save_report(tmp_path / "nothing.png") is None
    assert "predict first" in app.shown()["error"]
    assert not (tmp_path / "nothing.png").exists()


def test_window_reports_a_bundle_that_does_not_load(display: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-bundle"
    window = make_app(display, lambda: InProcessClient(missing))
    try:
        assert window.wait_idle(60)
        assert window.shown()["error"].startswith("Cannot start the service: ")
        assert str(missing) in window.shown()["error"]
        window.open_image(HAND)
        assert str(window.predict_button.cget("state")) == "disabled"
        window.predict()
        assert window.wait_idle(60)
        shown = window.shown()
        assert shown["error"].startswith("no service to ask: ")
        assert str(missing) in shown["error"]
        assert shown["fracture"] == ""
        assert shown["disclaimer"] == DISCLAIMER
    finally:
        window.close()


def test_describe_dicom_source_abstention_and_a_trained_model(tmp_path: Path) -> None:
    """The sentences for answers the tiny bundle does not give: no window needed."""
    prediction = {
        "image_name": "study.dcm",
        "body_part": {
            "label": "hand",
            "probability": None,
            "probabilities": None,
            "source": "dicom",
            "router_label": "elbow",
        },
        "fracture": {
            "label": "fractured",
            "probability": 0.8125,
            "threshold": 0.4,
            "suspicious": True,
            "definite": False,
        },
        "model": {"name": "real", "version": "1.0", "trained": True, "precision": "int8", "graph": "split"},
        "abstained": True,
        "abstention_reason": "router top probability under 0.5",
        "heatmap": None,
        "warnings": ["image is small"],
        "timings_ms": {"decode_ms": 1, "queue_ms": 0, "inference_ms": 1, "total_ms": 2, "batch_size": 1},
        "disclaimer": DISCLAIMER,
    }
    # The sentences are the core's (every answer carries them); the window only lays them out.
    prediction["summary"] = summarise(ImagePrediction.model_validate(prediction)).model_dump()
    description = describe(prediction)
    assert description.body_part == "Body part: hand, from the DICOM header; the router said elbow"
    assert description.fracture == "Fracture: FRACTURED - P(fractured) = 0.812 >= threshold 0.400"
    assert description.probabilities == "Router probabilities: not computed"
    assert "suspicious (high-sensitivity point): yes" in description.flags
    assert "definite (high-specificity point): no" in description.flags
    assert description.abstention.startswith("ABSTAINED: router top probability under 0.5")
    assert description.untrained is None
    assert description.model == "Model: real 1.0 (split, int8, trained)"
    assert description.warnings == ["image is small"]
    out = save_report(prediction, HAND, tmp_path / "report.png")  # no overlay: the image itself
    with Image.open(out) as report:
        assert report.format == "PNG"
        assert report.height > 640


# --- over real HTTP: `bfd serve` as a process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with bfd_serve(bundle, tmp_path_factory.mktemp("serve")) as served:
        yield served.url


def test_http_client_against_bfd_serve(server: str, expected: dict[str, Any], tmp_path: Path) -> None:
    with HttpClient(server, timeout_s=60) as client:
        answer = client.predict(HAND)
        assert answer["image_name"] == HAND.name
        assert answer["body_part"]["label"] == expected["body_part"]["label"]
        assert answer["fracture"]["probability"] == pytest.approx(expected["fracture"]["probability"], abs=1e-6)
        assert answer["heatmap"]["overlay_png_base64"]
        assert client.predict(HAND, heatmap=False)["heatmap"] is None
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(b"\xff\xd8\xff garbage")
        with pytest.raises(ClientError) as refused:
            client.predict(broken)
        assert refused.value.status == 422
        assert refused.value.detail
        with pytest.raises(ClientError, match="cannot read"):
            client.predict(tmp_path / "missing.png")
    with pytest.raises(ClientError) as unreachable, HttpClient(f"http://127.0.0.1:{free_port()}") as nobody:
        nobody.predict(HAND)
    assert unreachable.value.status == 0


def test_window_over_http(server: str, display: str, expected: dict[str, Any]) -> None:
    window = make_app(display, HttpClient(server, timeout_s=60))
    try:
        window.open_image(HAND)
        window.predict()
        assert window.wait_idle(120)
        shown = window.shown()
        assert shown["error"] == ""
        assert f"P(fractured) = {expected['fracture']['probability']:.3f}" in shown["fracture"]
        assert "UNTRAINED MODEL" in shown["untrained"]
    finally:
        window.close()


# --- `bfd desktop` ------------------------------------------------------------------------------------------


def test_desktop_imports_no_tensorflow() -> None:
    """Like service/: the desktop runs on the serving install, which has no TensorFlow."""
    code = (
        "import json, sys; import desktop, desktop.app, desktop.cli, desktop.client, desktop.report; "
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=_env_with_repo(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "desktop" in loaded
    assert loaded.isdisjoint({"tensorflow", "keras", "tf2onnx", "training", "export"})


def _env_with_repo(**extra: str) -> dict[str, str]:
    """The environment with the repository on the path (also before `desktop` is in the editable install)."""
    env = {**os.environ, **extra}
    root = str(Path(__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def test_cli_arguments() -> None:
    parser = argparse.ArgumentParser()
    desktop_cli.add_arguments(parser)
    defaults = parser.parse_args([])
    assert defaults.bundle == Path("models/demo")
    assert defaults.url is None
    assert defaults.image is None
    remote = parser.parse_args(["--url", "http://127.0.0.1:8000", "--image", str(HAND)])
    assert remote.url == "http://127.0.0.1:8000"
    assert remote.image == HAND
    with pytest.raises(SystemExit):
        parser.parse_args(["--url", "http://x", "--bundle", "models/demo"])


def test_cli_without_a_display_says_so() -> None:
    """In a fresh process: Tk remembers displays it has opened, so this process cannot test it."""
    env = _env_with_repo()
    env.pop("DISPLAY", None)
    code = "import argparse, sys; from desktop import cli; sys.exit(cli.run(argparse.Namespace(url='http://x')))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "cannot open a window" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_run_opens_the_window_and_closes_the_service(
    display: str, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import desktop.app

    seen: dict[str, Any] = {}

    class Spy(DesktopApp):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen["app"] = self

    def mainloop(root: tkinter.Tk, n: int = 0) -> None:
        """Instead of waiting for a person: let the bundle load, look, then close as the window's button does."""
        window: DesktopApp = seen["app"]
        assert window.wait_idle(60)
        seen["shown"] = window.shown()
        root.tk.call(root.protocol("WM_DELETE_WINDOW"))

    monkeypatch.setenv("DISPLAY", display)
    monkeypatch.setattr(desktop.app, "DesktopApp", Spy)
    monkeypatch.setattr(tkinter.Tk, "mainloop", mainloop)
    args = argparse.Namespace(url=None, bundle=bundle, image=HAND, api_key=None, timeout_s=10.0)
    assert desktop_cli.run(args) == 0
    shown = seen["shown"]
    assert shown["title"] == TITLE
    assert shown["file"] == HAND.name
    assert shown["picture"] == "image"
    assert "Ready: InProcessClient" in shown["status"]
    client = seen["app"].client
    assert isinstance(client, InProcessClient)
    assert client.closed
