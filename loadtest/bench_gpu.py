"""GPU benchmark of a bundle's graphs: CUDA execution provider, IOBinding, batch 1 to 64, fp32 vs fp16.

    python -m loadtest.bench_gpu --bundle models/demo --images tests/data/xray --out loadtest/results

This module owns the device-side figures the CPU benchmarks cannot give: how fast the bundle's graphs run
on an NVIDIA GPU through the core's own engine (`inference.engine.Engine`, the service's sessions and options)
on onnxruntime's CUDA execution provider: with the batch kept on the device (`Engine.device_runner`,
IOBinding: the one host-to-device copy is not timed, results stay on the GPU), and through the core's routing
on host arrays (`inference.pipeline.predict_batch`, host copies timed), as the service runs a batch. For
each precision and batch size it reports images per second and the milliseconds per batch (p50, p99).

fp16: every graph converted with `onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)`
(uint8 image in, fp32 probabilities out; the uint8 -> float32 cast stays fp32, see `to_fp16`) and given to
the engine in place of the bundle's files. fp16 is reported ONLY when its labels agree with fp32's on at least
99% of the test images (`inference.agreement.label_agreement`: the same body part and the same fracture call
at the part's decision threshold); otherwise the report says it was refused and why. The demo bundle is
untrained: its probabilities sit near the thresholds more often than a trained model's, so a refusal there
says little about a trained bundle.

Without CUDA (no onnxruntime-gpu, no GPU, no driver) it prints why and exits with status 0, measuring
nothing (`--require-cuda` makes that exit status 2). The test images are FracAtlas radiographs, CC BY 4.0
(Abedeen et al., Scientific Data 10, 521 (2023); see tests/data/xray/README.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from inference.agreement import label_agreement
from inference.bundle import Bundle, graph_file_names, load_bundle
from inference.engine import Engine
from inference.pipeline import predict_batch
from loadtest.images import model_inputs

CUDA = "CUDAExecutionProvider"
FP16_MIN_AGREEMENT = 0.99  # fp16 is reported only where its labels agree with fp32's this often
Json = dict[str, Any]
NO_CUDA_MESSAGE = (
    "bench_gpu: CUDA is not available to onnxruntime {version} here ({reason}). Nothing was measured. "
    "Run it on a machine with an NVIDIA GPU, its driver, and onnxruntime-gpu installed in place of onnxruntime "
    "(pip uninstall onnxruntime && pip install onnxruntime-gpu, matching the machine's CUDA and cuDNN)."
)


class CudaUnavailableError(RuntimeError):
    """The CUDA execution provider cannot run here; the message says why."""


def require_cuda() -> None:
    available = ort.get_available_providers()
    if CUDA not in available:
        raise CudaUnavailableError(f"this onnxruntime build offers {available}")


def open_engine(bundle: Bundle, device_id: int, overrides: dict[str, bytes] | None = None) -> Engine:
    """The core's engine on the CUDA device (the service's own sessions and options), graphs replaced in memory."""
    engine = Engine(bundle, providers=["cuda"], device_id=device_id, graph_overrides=overrides)
    if engine.active_provider != CUDA:  # onnxruntime falls back to CPU quietly (no driver, no device)
        raise CudaUnavailableError(f"the sessions fell back to {engine.active_providers}")
    return engine


def to_fp16(path: Path) -> bytes:
    """The graph with fp16 weights and compute, uint8 input and fp32 outputs kept (keep_io_types).

    Casts to float32 (the uint8 image entering the graph) stay as they are, blocked from conversion: the
    converter would retype their outputs to float16 but leave their `to` attribute, a graph onnxruntime refuses.
    It then inserts the float32 -> float16 cast after them itself.
    """
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(path))
    casts_to_float = [
        node.name
        for node in model.graph.node
        if node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute)
    ]
    converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=casts_to_float)
    return bytes(converted.SerializeToString())


def time_batches(run: Any, seconds: float, min_iters: int) -> list[float]:
    """Milliseconds per call of `run`, after 3 warm-up calls, for `seconds` and at least `min_iters` calls."""
    for _ in range(3):
        run()
    times: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(times) < min_iters:
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(engine: Engine, images: np.ndarray, batch: int, seconds: float) -> Json:
    """One precision at one batch size: device-resident (IOBinding) and through the core's routing on host arrays."""
    batch_images = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
    result: Json = {"batch_size": batch}
    runs = (
        ("iobinding", engine.device_runner(batch_images)),
        ("host_copies", lambda: predict_batch(engine, batch_images)),
    )
    for mode, run in runs:
        times = time_batches(run, seconds / 2, min_iters=10)
        p50, p99 = np.percentile(times, [50, 99])
        result[mode] = {"images_per_second": batch * 1e3 / float(np.mean(times)), "p50_ms": p50, "p99_ms": p99}
    return result


def device_description(device_id: int) -> Json:
    info: Json = {
        "onnxruntime": ort.__version__,
        "onnxruntime_device": ort.get_device(),
        "providers": ort.get_available_providers(),
        "device_id": device_id,
        "host": platform.platform(),
        "python": platform.python_version(),
    }
    if shutil.which("nvidia-smi"):
        fields = "--query-gpu=name,memory.total,driver_version"
        query = ["nvidia-smi", f"--id={device_id}", fields, "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
        info["gpu"] = done.stdout.strip() or done.stderr.strip()
    return info


def run(args: argparse.Namespace) -> Json:
    require_cuda()
    bundle = load_bundle(args.bundle)
    images = model_inputs(args.images, bundle.manifest.input.resize)
    engines: dict[str, Engine] = {"fp32": open_engine(bundle, args.device)}
    report: Json = {
        "started_at": datetime.now(UTC).isoformat(),
        "device": device_description(args.device),
        "bundle": str(args.bundle),
        "bundle_precision": bundle.manifest.precision,
        "graph": bundle.manifest.graph.form,
        "test_images": len(images),
        "batch_sizes": args.batch_sizes,
        "seconds_per_cell": args.seconds,
        "precisions": {"fp32": {}},
    }
    reference = predict_batch(engines["fp32"], images)  # the core's routing, as the service answers
    if "fp16" in args.precisions:
        try:
            overrides = {name: to_fp16(bundle.path(name)) for name in graph_file_names(bundle.manifest.graph)}
            fp16 = open_engine(bundle, args.device, overrides)
            check = label_agreement(reference, predict_batch(fp16, images), bundle.manifest.thresholds).as_dict()
        except CudaUnavailableError:
            raise
        except Exception as error:  # the converter or onnxruntime refusing a graph: report, do not crash
            report["precisions"]["fp16"] = {"refused": f"conversion or session failed: {type(error).__name__}: {error}"}
        else:
            if check["label_agreement"] >= FP16_MIN_AGREEMENT:
                engines["fp16"] = fp16
                report["precisions"]["fp16"] = {"agreement_vs_fp32": check}
            else:
                report["precisions"]["fp16"] = {
                    "refused": f"labels differ from fp32 on {len(check['disagreeing_images'])} of "
                    f"{check['images']} test images",
                    "agreement_vs_fp32": check,
                }
    for precision, engine in engines.items():
        cells = [measure(engine, images, b, args.seconds) for b in args.batch_sizes]
        report["precisions"].setdefault(precision, {})["results"] = cells
        for cell in cells:
            rate = cell["iobinding"]["images_per_second"]
            print(f"{precision} batch {cell['batch_size']}: {rate:.0f} img/s (IOBinding)", flush=True)
    report["finished_at"] = datetime.now(UTC).isoformat()
    return report


def render_markdown(report: Json) -> str:
    device = report["device"]
    lines = [
        f"# GPU benchmark ({device.get('gpu', 'GPU')}, onnxruntime {device['onnxruntime']})",
        "",
        f"Bundle `{report['bundle']}` ({report['graph']} graph, {report['bundle_precision']}), "
        f"{report['seconds_per_cell']:g} s per cell; CUDA execution provider. 'IOBinding': input and outputs on "
        "the device; 'host': numpy in and out (copies timed).",
        "",
        "| precision | batch | IOBinding img/s | p50 ms | p99 ms | host img/s | host p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for precision, entry in report["precisions"].items():
        for cell in entry.get("results", []):
            device_run, host = cell["iobinding"], cell["host_copies"]
            lines.append(
                f"| {precision} | {cell['batch_size']} | {device_run['images_per_second']:.0f} | "
                f"{device_run['p50_ms']:.2f} | {device_run['p99_ms']:.2f} | {host['images_per_second']:.0f} | "
                f"{host['p50_ms']:.2f} |"
            )
    lines.append("")
    fp16 = report["precisions"].get("fp16")
    if fp16 is not None:
        check = fp16.get("agreement_vs_fp32")
        if "refused" in fp16:
            lines.append(f"fp16 REFUSED: {fp16['refused']}.")
        if check:
            lines.append(
                f"fp16 vs fp32 on {check['images']} test images: label agreement {check['label_agreement']:.0%}, "
                f"max |Δ P(fractured)| {check['max_p_fractured_abs_diff']:.2g}."
            )
    lines += [
        "",
        "Test images: FracAtlas (Abedeen et al., Scientific Data 10, 521 (2023)), CC BY 4.0; see "
        "tests/data/xray/README.md.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/demo"))
    parser.add_argument("--images", type=Path, default=Path("tests/data/xray"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "fp16"], default=["fp32", "fp16"])
    parser.add_argument("--seconds", type=float, default=4.0, help="per precision and batch size")
    parser.add_argument("--device", type=int, default=0, help="CUDA device id")
    parser.add_argument("--require-cuda", action="store_true", help="exit 2 (not 0) when CUDA is unavailable")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except CudaUnavailableError as error:
        print(NO_CUDA_MESSAGE.format(version=ort.__version__, reason=error), file=sys.stderr)
        return 2 if args.require_cuda else 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_benchmark.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    markdown = render_markdown(report)
    (args.out / "gpu_benchmark.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
