"""Keeping strangers out: the optional API key, CORS, settings from the environment, and a fuzzed upload API.

The fuzz tests throw arbitrary bodies, content types, multipart parts and JSON at every upload route and
require a clear answer: never a 5xx, never a crash, and the service still answers normally afterwards.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import build_tiny_bundle, encode_png, image_for_part
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from service.main import create_app
from service.settings import Settings

KEY = "s3cret-key-for-tests"
GOOD_PNG = encode_png(image_for_part(1)[:40, :40])
UPLOAD_ROUTES = ["/v1/predict", "/v1/studies", "/api/analysis"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("security") / "bundle")


def own_database(tmp_path_factory: pytest.TempPathFactory, name: str) -> str:
    """A SQLite file of the app's own: the two module-scoped apps are alive at once, and a SQLite file is one
    store's alone (the second app on conftest's shared file answered every storage call 503)."""
    return f"sqlite+aiosqlite:///{tmp_path_factory.mktemp(name) / 'results.sqlite3'}"


@pytest.fixture(scope="module")
def locked(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = create_app(
        Settings(
            bundle=bundle,
            api_key=KEY,
            cors_origins=["https://viewer.example.org"],
            database_url=own_database(tmp_path_factory, "locked"),
        )
    )
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def open_client(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    configured = Settings(bundle=bundle, database_url=own_database(tmp_path_factory, "open"))
    with TestClient(create_app(configured)) as client:
        yield client


@pytest.mark.parametrize("route", UPLOAD_ROUTES)
def test_every_upload_route_needs_the_key(locked: TestClient, route: str) -> None:
    files = {"file": ("a.png", GOOD_PNG, "image/png")}
    missing = locked.post(route, files=files)
    wrong = locked.post(route, files=files, headers={"X-API-Key": "guess"})
    by_header = locked.post(route, files=files, headers={"X-API-Key": KEY})
    by_bearer = locked.post(route, files=files, headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 401
    assert "API key" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 403
    assert by_header.status_code in (200, 201), by_header.text
    assert by_bearer.status_code in (200, 201), by_bearer.text


def test_reads_need_the_key_but_probes_and_the_page_shell_do_not(locked: TestClient) -> None:
    assert locked.get("/v1/models").status_code == 401
    assert locked.get("/api/analysis").status_code == 401
    assert locked.get("/api/analysis", headers={"X-API-Key": KEY}).status_code == 200
    for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert locked.get(open_path).status_code == 200, open_path


def test_without_a_key_configured_nothing_is_asked(open_client: TestClient) -> None:
    assert open_client.post("/v1/predict", files={"file": ("a.png", GOOD_PNG)}).status_code == 200
    assert open_client.get("/v1/models").status_code == 200


def test_cors_allows_only_the_configured_origins(locked: TestClient) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
    allowed = locked.options("/v1/predict", headers={"Origin": "https://viewer.example.org", **preflight})
    other = locked.options("/v1/predict", headers={"Origin": "https://evil.example.com", **preflight})
    assert allowed.headers.get("access-control-allow-origin") == "https://viewer.example.org"
    assert "access-control-allow-origin" not in other.headers


def test_lists_and_the_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BFD_PROVIDERS", "cuda,cpu")
    monkeypatch.setenv("BFD_CORS_ORIGINS", "https://a.org, https://b.org")
    monkeypatch.setenv("BFD_API_KEY", KEY)
    settings_from_env = Settings()
    assert settings_from_env.providers == ["cuda", "cpu"]
    assert settings_from_env.cors_origins == ["https://a.org", "https://b.org"]
    assert settings_from_env.api_key is not None
    assert settings_from_env.api_key.get_secret_value() == KEY
    assert KEY not in repr(settings_from_env)  # never printed in logs or tracebacks
    monkeypatch.delenv("BFD_API_KEY")
    assert Settings().api_key is None  # unset: no key (the local demo)


@pytest.mark.parametrize("empty", ["", "   ", "\t\n"])
def test_an_empty_api_key_is_refused_not_taken_for_none(monkeypatch: pytest.MonkeyPatch, empty: str) -> None:
    """An empty key used to turn authentication off without a word (a template's BFD_API_KEY="", a missing
    secret): now the service refuses to start and says why."""
    monkeypatch.setenv("BFD_API_KEY", empty)
    with pytest.raises(ValidationError, match=r"api_key \(BFD_API_KEY\) must be a real key or unset"):
        Settings()
    monkeypatch.delenv("BFD_API_KEY")
    with pytest.raises(ValidationError, match="must be a real key or unset"):
        Settings(api_key=empty)
    with pytest.raises(ValidationError, match="must be a real key or unset"):
        Settings(api_key=SecretStr(empty))


# --- fuzzing --------------------------------------------------------------------------------------------------

CONTENT_TYPES = st.sampled_from(
    [
        "image/png",
        "image/jpeg",
        "application/dicom",
        "application/json",
        "multipart/form-data; boundary=xyz",
        "multipart/form-data",
        "text/plain",
        "application/octet-stream",
        "",
    ]
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _assert_clear_answer(response_status: int, body: bytes) -> None:
    assert response_status < 500, body[:500]
    assert 200 <= response_status < 300 or "detail" in json.loads(body)


@FUZZ
@given(route=st.sampled_from(UPLOAD_ROUTES), content_type=CONTENT_TYPES, body=st.binary(max_size=4096))
def test_fuzzed_raw_bodies_get_a_clear_answer(
    open_client: TestClient, route: str, content_type: str, body: bytes
) -> None:
    response = open_client.post(route, content=body, headers={"content-type": content_type})
    _assert_clear_answer(response.status_code, response.content)


@FUZZ
@given(
    route=st.sampled_from(UPLOAD_ROUTES),
    field=st.sampled_from(["file", "image", "other"]),
    filename=st.text(max_size=40),
    payload=st.one_of(st.binary(max_size=2048), st.just(GOOD_PNG), st.just(GOOD_PNG[: len(GOOD_PNG) // 2])),
    body_part=st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["hand", "elbow", "HAND"])),
    heatmap=st.sampled_from(["true", "false", "1", "maybe", ""]),
)
def test_fuzzed_multipart_uploads_get_a_clear_answer(
    open_client: TestClient, route: str, field: str, filename: str, payload: bytes, body_part: str | None, heatmap: str
) -> None:
    data = {"heatmap": heatmap} | ({} if body_part is None else {"body_part": body_part})
    response = open_client.post(route, files={field: (filename or "x", payload)}, data=data)
    _assert_clear_answer(response.status_code, response.content)


@FUZZ
@given(
    document=st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=10,
    ),
    with_image=st.booleans(),
)
def test_fuzzed_json_gets_a_clear_answer(open_client: TestClient, document: object, with_image: bool) -> None:
    if with_image and isinstance(document, dict):
        document["image"] = base64.b64encode(GOOD_PNG).decode()
    response = open_client.post("/v1/predict", json=document)
    _assert_clear_answer(response.status_code, response.content)


def test_the_service_still_answers_after_the_fuzzing(open_client: TestClient) -> None:
    response = open_client.post("/v1/predict", files={"file": ("a.png", GOOD_PNG)})
    assert response.status_code == 200
    assert response.json()["predictions"][0]["body_part"]["label"] == "hand"
