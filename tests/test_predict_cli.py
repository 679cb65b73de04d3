"""`bfd predict --url`: against a server that wants an API key, and against something that is not our server."""

from __future__ import annotations

import argparse
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import build_tiny_bundle

from clients import predict_cli
from loadtest.servers import bfd_serve

# FracAtlas (Abedeen et al., Scientific Data 10, 521 (2023)), CC BY 4.0: see tests/data/xray/README.md
HAND = Path(__file__).parent / "data" / "xray" / "hand" / "fractured" / "fracatlas_IMG0003396.jpg"
KEY = "test-key-0123456789abcdef"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    predict_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("predict-cli")
    with bfd_serve(build_tiny_bundle(root / "bundle"), root, env={"BFD_API_KEY": KEY}) as served:
        yield served.url


def test_remote_sends_the_api_key(
    locked_server: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BFD_API_KEY", raising=False)
    assert predict_cli.run(_parse(str(HAND), "--url", locked_server)) == 1
    (refused,) = _lines(capsys)
    assert refused["error"]["status"] == 401  # type: ignore[index]
    assert predict_cli.run(_parse(str(HAND), "--url", locked_server, "--api-key", KEY)) == 0
    (answer,) = _lines(capsys)
    assert answer["image_name"] == HAND.name
    monkeypatch.setenv("BFD_API_KEY", KEY)  # the environment is the default
    assert predict_cli.run(_parse(str(HAND), "--url", locked_server)) == 0
    assert _lines(capsys)[0]["image_name"] == HAND.name


class _BadGateway(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b"<html><body>502 Bad Gateway</body></html>"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def test_remote_reports_a_non_json_error_instead_of_crashing(capsys: pytest.CaptureFixture[str]) -> None:
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadGateway)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        code = predict_cli.run(_parse(str(HAND), "--url", f"http://127.0.0.1:{proxy.server_address[1]}"))
    finally:
        proxy.shutdown()
    assert code == 1
    (line,) = _lines(capsys)
    assert line["error"] == {"status": 502, "detail": "<html><body>502 Bad Gateway</body></html>"}
