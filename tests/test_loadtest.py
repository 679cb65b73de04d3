"""The load-test tooling runs end to end on tiny bundles: bench_load, the baselines, the locustfile, bench_gpu.

Everything under loadtest/ runs here as it runs for a person, in subprocesses from the repository root
(`python -m loadtest...`), against real `bfd serve` and baseline processes on tiny bundles, in a
configuration small enough for a 2-core machine (well under two minutes in all). The figures themselves
mean nothing here; the tests check that every field the real run reports is there and sane, that the naive
baseline answers exactly as our service does on the same graphs, and that overload is refused only with 503.
Images: FracAtlas radiographs, CC BY 4.0 (see tests/data/xray/README.md).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime
import pytest
from factories import build_tiny_bundle

from loadtest.servers import bfd_serve

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
XRAY = Path(__file__).parent / "data" / "xray"  # FracAtlas, CC BY 4.0: see tests/data/xray/README.md
# Distinct specialists, so an image routed to the wrong part would show a different P(fractured).
OFFSETS = {"elbow": 0.0, "hand": 0.1, "shoulder": 0.2}
CONCURRENCY = (1, 4)


def _run(args: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loadtest")
    fused = build_tiny_bundle(root / "tiny", specialist_offsets=OFFSETS)
    split = build_tiny_bundle(root / "tiny-split", form="split", specialist_offsets=OFFSETS)
    return fused, split


@pytest.fixture(scope="module")
def report(bundles: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("psutil", reason="bench_load reads the server's CPU and RSS with psutil (the load extra)")
    fused, split = bundles
    out = tmp_path_factory.mktemp("bench-load")
    args = ["-m", "loadtest.bench_load", "--bundle", str(fused), "--split-bundle", str(split), "--skip-keras"]
    args += ["--images", str(XRAY), "--sizes", "500", "--duration-s", "1.5", "--warmup-s", "0.5"]
    args += ["--concurrency", *map(str, CONCURRENCY), "--overload-s", "3", "--out", str(out)]
    done = _run(args, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "load_benchmark.md").is_file()
    markdown = (out / "load_benchmark.md").read_text()
    for heading in ("Closed loop", "Ratios", "open loop", "Overload", "Targets", "FracAtlas"):
        assert heading in markdown
    data: dict[str, Any] = json.loads((out / "load_benchmark.json").read_text())
    return data


def _check_step(step: dict[str, Any]) -> None:
    assert step["throughput_img_s"] > 0
    latency = step["latency_ms"]
    assert latency["n"] > 0
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert isinstance(step["errors"], dict)
    assert sum(step["statuses"].values()) == step["requests"]
    assert step["server_cpu_percent"] > 0
    assert step["client_cpu_percent"] > 0
    assert step["other_cpu_percent"] >= 0
    assert step["steal_percent"] >= 0
    rss = step["server_rss_mb"]
    assert rss["before"] > 0
    assert rss["max"] >= rss["end"] > 0


def test_bench_load_reports_every_closed_loop_field(report: dict[str, Any]) -> None:
    machine = report["machine"]
    assert machine["usable_cores"] >= 1
    assert machine["memory_gib"] > 0
    assert machine["cpu_model"]
    assert machine["onnxruntime"]
    servers = report["servers"]
    assert servers["keras"] == {"skipped": "--skip-keras"}
    for name in ("ours", "naive"):
        steps = servers[name]["closed_loop"]
        assert [step["concurrency"] for step in steps] == list(CONCURRENCY)
        for step in steps:
            _check_step(step)
            assert step["errors"] == {}, step["errors"]
    for step in servers["ours"]["closed_loop"]:
        batches = step["batch_sizes"]
        assert batches["batches"] > 0
        assert batches["mean_batch_size"] >= 1
        assert sum(batches["histogram"].values()) == batches["batches"]
        assert batches["images"] >= batches["batches"]
        assert batches["server_side_predict_statuses"].get("200", 0) > 0
    assert all(step["batch_sizes"] is None for step in servers["naive"]["closed_loop"])
    for c in CONCURRENCY:
        ratio = report["ratios"]["ours_vs_naive"][str(c)]
        assert ratio["throughput"] > 0
        assert ratio["p50_latency_theirs_over_ours"] > 0


def test_bench_load_open_loop_and_overload(report: dict[str, Any]) -> None:
    ours = report["servers"]["ours"]
    assert ours["capacity_img_s"] == max(step["throughput_img_s"] for step in ours["closed_loop"])
    fractions = [step["fraction_of_capacity"] for step in ours["open_loop"]]
    assert fractions == [0.5, 0.9]
    for step in ours["open_loop"]:
        assert step["offered_rate_img_s"] > 0
        assert step["accepted"] > 0
        assert step["send_lag_ms"]["n"] == step["requests"]
        assert step["batch_sizes"]["batches"] > 0
    overload = ours["overload"]
    assert overload["fraction_of_capacity"] == 2.0
    assert overload["accepted"] > 0
    # refusals are 503 with Retry-After and nothing else: no other 5xx, no dropped connection
    assert set(overload["statuses"]) <= {"200", "503"}, overload["statuses"]
    assert overload["refused_503"] == overload["statuses"].get("503", 0) == overload["refused_503_with_retry_after"]
    assert overload["other_5xx"] == 0
    assert overload["transport_errors"] == 0
    assert overload["only_503_refusals"] is True
    assert overload["latency_ms"]["p99"] > 0
    assert overload["recovered"]["status"] == 200
    assert all(value > 0 for value in overload["rss_mb"].values())
    bound = overload["boundedness"]
    assert bound["max_queue_size"] >= 1
    assert bound["full_queue_ms_at_capacity"] > 0
    assert bound["full_queue_ms_at_achieved_rate"] > 0
    assert isinstance(bound["bounded"], bool)
    targets = report["targets"]
    assert targets["overload_only_503_and_recovers"]["met"] is True
    assert targets[f"ours_vs_naive_at_c{max(CONCURRENCY)}"]["measured"] > 0


def test_naive_baseline_answers_like_our_service(report: dict[str, Any]) -> None:
    ours, naive = report["servers"]["ours"]["answer"], report["servers"]["naive"]["answer"]
    assert ours["status"] == naive["status"] == 200
    assert ours["image"] == naive["image"]
    assert naive["body_part"] == ours["body_part"]
    assert naive["p_fractured"] == pytest.approx(ours["p_fractured"], abs=1e-6)
    check = report["servers"]["naive"]["answer_vs_ours"]
    assert check["same_body_part"] is True
    assert check["p_fractured_abs_diff"] <= 1e-6


_LOCUST_PROBE = """
import json, locust, loadtest.locustfile as lf
users = {name: cls for name, cls in vars(lf).items()
         if isinstance(cls, type) and issubclass(cls, locust.HttpUser) and not getattr(cls, 'abstract', False)}
print(json.dumps({name: {'endpoint': cls.endpoint, 'method': cls.method, 'tasks': len(cls.tasks)}
                  for name, cls in users.items()}))
"""


def _locust_installed() -> bool:
    # Not imported here: importing locust monkey-patches the standard library (gevent) for the whole process.
    return importlib.util.find_spec("locust") is not None


@pytest.mark.skipif(not _locust_installed(), reason="locust is not installed (the load extra)")
def test_locustfile_users_post_to_existing_routes(bundles: tuple[Path, Path]) -> None:
    from service.main import create_app
    from service.settings import Settings

    done = _run(["-c", _LOCUST_PROBE], timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    users = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(users) == {"MultipartUser", "Base64User"}
    # The OpenAPI schema is the service's published contract (and sees into included routers).
    paths = create_app(Settings(bundle=bundles[0])).openapi()["paths"]
    for name, user in users.items():
        assert user["method"].lower() in paths.get(user["endpoint"], {}), f"{name}: {user} is not a route"
        assert user["tasks"] >= 1


@pytest.fixture
def tiny_server(bundles: tuple[Path, Path], tmp_path: Path) -> Iterator[str]:
    with bfd_serve(bundles[0], tmp_path / "serve", args=["--log-level", "warning"]) as served:
        yield served.url


@pytest.mark.skipif(not _locust_installed(), reason="locust is not installed (the load extra)")
def test_locust_headless_run_succeeds(tiny_server: str, tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    args = ["-m", "locust", "-f", "loadtest/locustfile.py", "--host", tiny_server, "--users", "4"]
    args += ["--spawn-rate", "4", "--run-time", "3s", "--headless", "--only-summary", "--csv", str(prefix)]
    done = _run(args, timeout=90, env={**os.environ, "BFD_LOAD_IMAGES": str(XRAY)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (tmp_path / "locust_stats.csv").open(newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    for name in ("/v1/predict [multipart]", "/v1/predict [json]"):
        assert int(rows[name]["Request Count"]) > 0, rows
        assert int(rows[name]["Failure Count"]) == 0, rows


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(),
    reason="CUDA is available here: bench_gpu would measure, not refuse",
)
def test_bench_gpu_without_cuda_exits_with_a_clear_message(bundles: tuple[Path, Path], tmp_path: Path) -> None:
    args = ["-m", "loadtest.bench_gpu", "--bundle", str(bundles[0]), "--out", str(tmp_path / "gpu")]
    done = _run(args, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "CUDA is not available" in done.stderr
    assert "Nothing was measured" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "gpu").exists()
    strict = _run([*args, "--require-cuda"], timeout=60)
    assert strict.returncode == 2
    assert "CUDA is not available" in strict.stderr
