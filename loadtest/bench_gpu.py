"""GPU benchmark of a bundle's graphs: CUDA execution provider, IOBinding, batch 1 to 64, fp32 vs fp16.

    python -m loadtest.bench_gpu --bundle models/demo --images tests/data/xray --out loadtest/results

This module owns the device-side figures the CPU benchmarks cannot give: how fast the bundle's graphs run
on an NVIDIA GPU through onnxruntime's CUDA execution provider, with the input and outputs kept on the
device (IOBinding: one host-to-device copy of the uint8 batch per run is NOT timed; results stay on the GPU),
and for comparison with plain `session.run` on numpy arrays (host copies timed). For each precision and
batch size it reports images per second and the milliseconds per batch (p50, p99).

fp16: every graph converted with `onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)`
(uint8 image in, fp32 probabilities out; the uint8 -> float32 cast stays fp32, see `to_fp16`). fp16 is
reported ONLY when its labels (body part, and fractured at the part's decision threshold) agree with fp32's
on every test image; otherwise the report says it was refused and why. The demo bundle is untrained: its
probabilities sit near the thresholds more often than a trained model's, so a refusal there says little
about a trained bundle.

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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.bundle import Bundle, FusedGraph, load_bundle

CUDA = "CUDAExecutionProvider"
DEVICE = "cuda"  # where IOBinding keeps inputs and outputs
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
Json = dict[str, Any]
NO_CUDA_MESSAGE = (
    "bench_gpu: CUDA is not available to onnxruntime {version} here ({reason}). Nothing was measured. "
    "Run it on a machine with an NVIDIA GPU, its driver, and onnxruntime-gpu installed in place of onnxruntime "
    "(pip uninstall onnxruntime && pip install onnxruntime-gpu, matching the machine's CUDA and cuDNN)."
)


class CudaUnavailableError(RuntimeError):
    """The CUDA execution provider cannot run here; the message says why."""


@dataclass
class GraphSet:
    """A bundle's graphs as sessions of one precision, run the way the service runs them."""

    bundle: Bundle
    sessions: dict[str, ort.InferenceSession]  # 'fused', or 'router' and one per part

    @property
    def fused(self) -> bool:
        return isinstance(self.bundle.manifest.graph, FusedGraph)

    def answers(self, images: np.ndarray) -> list[tuple[str, float]]:
        """(body part, P(fractured)) per image through plain session.run (host arrays)."""
        manifest = self.bundle.manifest
        parts, graph, name = manifest.body_parts, manifest.graph, manifest.input.name
        if isinstance(graph, FusedGraph):
            body, p = self.sessions["fused"].run([graph.body_part_probs, graph.p_fractured], {name: images})
            picks = np.argmax(body, axis=1)
            return [(parts[k], float(p[i, k])) for i, k in enumerate(picks)]
        body = self.sessions["router"].run([graph.body_part_probs], {name: images})[0]
        out = []
        for i, k in enumerate(np.argmax(body, axis=1)):
            p = self.sessions[parts[k]].run([graph.p_fractured], {name: images[i : i + 1]})[0]
            out.append((parts[k], float(p[0, 0])))
        return out

    def runs(self) -> list[tuple[ort.InferenceSession, list[str]]]:
        """What one batch costs: the fused graph, or the router then one specialist (all images one part)."""
        graph = self.bundle.manifest.graph
        if isinstance(graph, FusedGraph):
            return [(self.sessions["fused"], [graph.body_part_probs, graph.p_fractured])]
        first = self.bundle.manifest.body_parts[0]
        return [(self.sessions["router"], [graph.body_part_probs]), (self.sessions[first], [graph.p_fractured])]


def require_cuda() -> None:
    available = ort.get_available_providers()
    if CUDA not in available:
        raise CudaUnavailableError(f"this onnxruntime build offers {available}")


def open_sessions(bundle: Bundle, models: dict[str, bytes | str], device_id: int) -> GraphSet:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers: list[Any] = [(CUDA, {"device_id": device_id}), "CPUExecutionProvider"]
    sessions = {}
    for key, model in models.items():
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
        if session.get_providers()[0] != CUDA:  # onnxruntime falls back to CPU quietly (no driver, no device)
            raise CudaUnavailableError(f"the session for {key} fell back to {session.get_providers()}")
        sessions[key] = session
    return GraphSet(bundle, sessions)


def graph_files(bundle: Bundle) -> dict[str, Path]:
    graph = bundle.manifest.graph
    if isinstance(graph, FusedGraph):
        return {"fused": bundle.path(graph.file)}
    return {"router": bundle.path(graph.router), **{p: bundle.path(f) for p, f in graph.specialists.items()}}


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


def agreement(bundle: Bundle, reference: list[tuple[str, float]], other: list[tuple[str, float]]) -> Json:
    thresholds = bundle.manifest.thresholds
    same = [
        a[0] == b[0] and (a[1] >= thresholds[a[0]].decision) == (b[1] >= thresholds[b[0]].decision)
        for a, b in zip(reference, other, strict=True)
    ]
    return {
        "images": len(same),
        "label_agreement": float(np.mean(same)),
        "disagreeing_images": [i for i, ok in enumerate(same) if not ok],
        "max_p_fractured_abs_diff": max(abs(a[1] - b[1]) for a, b in zip(reference, other, strict=True)),
    }


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


def measure(graphs: GraphSet, images: np.ndarray, batch: int, seconds: float, device_id: int) -> Json:
    """One precision at one batch size: IOBinding (device-resident) and plain host-array runs."""
    batch_images = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
    name = graphs.bundle.manifest.input.name
    on_device = ort.OrtValue.ortvalue_from_numpy(batch_images, DEVICE, device_id)
    bindings = []
    for session, outputs in graphs.runs():
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, on_device)
        for output in outputs:
            binding.bind_output(output, DEVICE, device_id)
        bindings.append((session, binding))

    def device_run() -> None:
        for session, binding in bindings:
            session.run_with_iobinding(binding)  # synchronous: returns once the device is done

    def host_run() -> None:
        for session, outputs in graphs.runs():
            session.run(outputs, {name: batch_images})

    result: Json = {"batch_size": batch}
    for mode, run in (("iobinding", device_run), ("host_copies", host_run)):
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


def load_images(folder: Path, bundle: Bundle) -> np.ndarray:
    from service.preprocessing import prepare_image_file

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"bench_gpu: no PNG/JPEG images under {folder}")
    return np.stack([prepare_image_file(p, resize=bundle.manifest.input.resize).pixels for p in paths])


def run(args: argparse.Namespace) -> Json:
    require_cuda()
    bundle = load_bundle(args.bundle)
    images = load_images(args.images, bundle)
    files = graph_files(bundle)
    fp32 = open_sessions(bundle, {key: str(path) for key, path in files.items()}, args.device)
    precisions: dict[str, GraphSet] = {"fp32": fp32}
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
    reference = precisions["fp32"].answers(images)
    if "fp16" in args.precisions:
        try:
            fp16 = open_sessions(bundle, {k: to_fp16(v) for k, v in files.items()}, args.device)
            check = agreement(bundle, reference, fp16.answers(images))
        except CudaUnavailableError:
            raise
        except Exception as error:  # the converter or onnxruntime refusing a graph: report, do not crash
            report["precisions"]["fp16"] = {"refused": f"conversion or session failed: {type(error).__name__}: {error}"}
        else:
            if check["label_agreement"] >= 1.0:
                precisions["fp16"] = fp16
                report["precisions"]["fp16"] = {"agreement_vs_fp32": check}
            else:
                report["precisions"]["fp16"] = {
                    "refused": f"labels differ from fp32 on {len(check['disagreeing_images'])} of "
                    f"{check['images']} test images",
                    "agreement_vs_fp32": check,
                }
    for precision, graphs in precisions.items():
        cells = [measure(graphs, images, b, args.seconds, args.device) for b in args.batch_sizes]
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
