"""Locust load profile for `bfd serve`: multipart uploads and JSON base64 bodies posted to POST /v1/predict.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000                    # web UI on :8089
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless \\
        --users 32 --spawn-rate 8 --run-time 2m --csv loadtest/results/locust          # CSV stats, no UI
    locust -f loadtest/locustfile.py --host ... MultipartUser                          # one mode only
    locust -f loadtest/locustfile.py --host ... --tags json                            # same, by tag

This module owns the interactive / exploratory load profile (the scripted, comparable figures come from
`loadtest.bench_load`). It needs only Locust and the standard library, so it runs from a separate load machine
without the project installed. Environment:

- BFD_LOAD_IMAGES: folder of images to send (PNG, JPEG, DICOM; searched recursively), default tests/data/xray
  (FracAtlas radiographs, CC BY 4.0: Abedeen et al., Scientific Data 10, 521 (2023); see its README.md);
- BFD_API_KEY: sent as `X-API-Key` when set (a server with BFD_API_KEY answers 401/403 without it);
- BFD_LOAD_WAIT_S: think time between a user's requests, default 0 (each user is a closed loop).

Requests are named `/v1/predict [multipart]` and `/v1/predict [json]` (type POST), so Locust's statistics group
them per mode; a 503 (queue full) is a failure named with its Retry-After, so refusals are counted apart.
"""

from __future__ import annotations

import base64
import functools
import os
import random
from pathlib import Path
from typing import Any

from locust import HttpUser, constant, tag, task

PREDICT_PATH = "/v1/predict"
DEFAULT_IMAGES = Path(__file__).resolve().parent.parent / "tests" / "data" / "xray"
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".dcm": "application/dicom"}


@functools.cache
def load_images() -> list[tuple[str, bytes, str]]:
    """(name, bytes, content type) of every image under BFD_LOAD_IMAGES, read once per process."""
    folder = Path(os.environ.get("BFD_LOAD_IMAGES", str(DEFAULT_IMAGES)))
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in CONTENT_TYPES)
    if not paths:
        raise RuntimeError(f"BFD_LOAD_IMAGES={folder}: no {sorted(CONTENT_TYPES)} files there")
    return [(p.name, p.read_bytes(), CONTENT_TYPES[p.suffix.lower()]) for p in paths]


def auth_headers() -> dict[str, str]:
    key = os.environ.get("BFD_API_KEY", "").strip()
    return {"X-API-Key": key} if key else {}


class _PredictUser(HttpUser):
    """Shared by both modes: the route, the think time, and what counts as a success."""

    abstract = True
    endpoint = PREDICT_PATH
    method = "POST"
    mode = ""
    wait_time = constant(float(os.environ.get("BFD_LOAD_WAIT_S", "0")))

    @property
    def request_name(self) -> str:
        return f"{self.endpoint} [{self.mode}]"

    def check(self, response: Any) -> None:  # locust's ResponseContextManager
        if response.status_code == 200:
            if "predictions" in (response.json() or {}):
                response.success()
            else:
                response.failure("200 without predictions")
        elif response.status_code == 503:
            response.failure(f"503 refused (Retry-After: {response.headers.get('Retry-After', 'missing')})")
        else:
            response.failure(f"{response.status_code}: {response.text[:200]}")


class MultipartUser(_PredictUser):
    """One image per request as multipart field `file`, the browser/curl way."""

    mode = "multipart"

    @tag("multipart")
    @task
    def predict_multipart(self) -> None:
        name, data, content_type = random.choice(load_images())
        with self.client.post(
            self.endpoint,
            files={"file": (name, data, content_type)},
            headers=auth_headers(),
            name=self.request_name,
            catch_response=True,
        ) as response:
            self.check(response)


class Base64User(_PredictUser):
    """One image per request as JSON `{"image": "<base64>", "image_name": ...}`, the API-client way."""

    mode = "json"

    @tag("json")
    @task
    def predict_json(self) -> None:
        name, data, _ = random.choice(load_images())
        body = {"image": base64.b64encode(data).decode("ascii"), "image_name": name}
        with self.client.post(
            self.endpoint, json=body, headers=auth_headers(), name=self.request_name, catch_response=True
        ) as response:
            self.check(response)
