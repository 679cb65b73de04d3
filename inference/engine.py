"""onnxruntime sessions for one bundle: synchronous, pure, and unaware of HTTP.

Sessions are created once (at start-up) and then used by ONE inference thread: measured on this project's
2-core machine, many threads sharing one session allocated activations per call (RSS 0.4 -> 1.5 GB at 32
callers) and served them unfairly, while one thread feeding batches was leaner and fairer. The engine
exposes the graphs as the manifest describes them; `inference.pipeline` does the routing on top. For
accelerators it also takes a CUDA device id, graphs replaced in memory (an fp16 conversion) and runs with
the batch kept on the device (`device_runner`, IOBinding), which the GPU benchmark uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from inference.bundle import Bundle, FusedGraph, SplitGraph
from inference.providers import AUTO_ORDER, PROVIDER_NAMES, default_intra_op_threads

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The bundle's graphs cannot be run with the requested providers."""


def choose_providers(requested: Sequence[str] | None) -> list[str]:
    """Providers in priority order, intersected with what this onnxruntime build offers.

    None or ["auto"] means CUDA where available, else CPU (TensorRT only when asked, since its engine build
    takes minutes on first start). CPU is always appended as the fallback.
    """
    available = set(ort.get_available_providers())
    lowered = [r.lower() for r in requested or []]
    explicit = bool(lowered) and lowered != ["auto"]
    names = lowered if explicit else list(AUTO_ORDER)
    unknown = [name for name in names if name not in PROVIDER_NAMES]
    if unknown:
        raise EngineError(f"unknown providers {unknown}; choose from {sorted(PROVIDER_NAMES)} or 'auto'")
    chosen = [PROVIDER_NAMES[n] for n in names if PROVIDER_NAMES[n] in available]
    for name in names:
        if PROVIDER_NAMES[name] not in available and explicit:
            log.warning("provider %s requested but not available in this onnxruntime build", name)
    if PROVIDER_NAMES["cpu"] not in chosen:
        chosen.append(PROVIDER_NAMES["cpu"])
    return chosen


def provider_options(providers: list[str], device_id: int) -> list[str | tuple[str, dict[str, Any]]]:
    """onnxruntime's provider list with the device id given to the accelerators that take one."""
    with_device = {PROVIDER_NAMES["cuda"], PROVIDER_NAMES["tensorrt"]}
    return [(name, {"device_id": device_id}) if name in with_device else name for name in providers]


@dataclass(frozen=True)
class FusedOutputs:
    body_part_probs: np.ndarray  # (N, P) float32
    p_fractured: np.ndarray  # (N, P) float32
    feature_map: np.ndarray | None  # (N, 7, 7, 2048) float32 when asked for


class Engine:
    """The bundle's ONNX graphs as sessions."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        spinning: bool = False,
        device_id: int = 0,
        graph_overrides: Mapping[str, bytes] | None = None,
    ) -> None:
        """`graph_overrides` replaces graph files of the bundle (by manifest file name) with serialized models,
        e.g. an fp16 conversion measured against the bundle's own graphs; answers then come from those."""
        # Medical-imaging deployments send nothing home: onnxruntime's own telemetry off (the images also set
        # ORT_DISABLE_TELEMETRY=1 for the native side).
        if hasattr(ort, "disable_telemetry_events"):
            ort.disable_telemetry_events()
        self.bundle = bundle
        manifest = bundle.manifest
        self.body_parts = list(manifest.body_parts)
        self.input_name = manifest.input.name
        self.requested_providers = choose_providers(providers)
        self.intra_op_threads = intra_op_threads or default_intra_op_threads()
        self.spinning = spinning
        self.device_id = device_id
        self._overrides = dict(graph_overrides or {})
        graph = manifest.graph
        self.graph: FusedGraph | SplitGraph = graph
        self._sessions: dict[str, ort.InferenceSession] = {}
        if isinstance(graph, FusedGraph):
            outputs = [graph.body_part_probs, graph.p_fractured, graph.feature_map]
            self._sessions["fused"] = self._open(graph.file, outputs)
        else:
            self._sessions["router"] = self._open(graph.router, [graph.body_part_probs])
            for part in self.body_parts:
                outputs = [graph.p_fractured, graph.feature_map]
                self._sessions[f"specialist/{part}"] = self._open(graph.specialists[part], outputs)
        self.active_providers = next(iter(self._sessions.values())).get_providers()
        log.info(
            "bundle %s %s (%s, %s graph) on %s with %d intra-op threads",
            manifest.name,
            manifest.version,
            manifest.precision,
            graph.form,
            self.active_providers[0],
            self.intra_op_threads,
        )

    @property
    def fused(self) -> bool:
        return isinstance(self.graph, FusedGraph)

    @property
    def active_provider(self) -> str:
        return self.active_providers[0]

    def _open(self, name: str, expected_outputs: list[str]) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads spin by default, burning the cores the decode pool needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        path = self.bundle.path(name)
        model: str | bytes = self._overrides.get(name, str(path))
        providers = provider_options(self.requested_providers, self.device_id)
        try:
            session = ort.InferenceSession(model, sess_options=options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types
            raise EngineError(f"{path}: onnxruntime cannot load this graph ({error})") from error
        inputs = [i.name for i in session.get_inputs()]
        if inputs != [self.input_name]:
            raise EngineError(f"{path}: graph inputs {inputs}, manifest says [{self.input_name!r}]")
        outputs = [o.name for o in session.get_outputs()]
        missing = [name for name in expected_outputs if name not in outputs]
        if missing:
            raise EngineError(f"{path}: graph outputs {outputs}, manifest expects {expected_outputs}")
        return session

    def _check(self, images: np.ndarray) -> None:
        contract = self.bundle.manifest.input
        expected = (contract.height, contract.width, contract.channels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"expected (N, {expected[0]}, {expected[1]}, 3) uint8, got {images.shape} {images.dtype}")

    def run_fused(self, images: np.ndarray, *, feature_map: bool = False) -> FusedOutputs:
        """(N, 224, 224, 3) uint8 -> every head's answer from one backbone pass."""
        self._check(images)
        graph = self.graph
        assert isinstance(graph, FusedGraph)
        names = [graph.body_part_probs, graph.p_fractured] + ([graph.feature_map] if feature_map else [])
        outputs = self._sessions["fused"].run(names, {self.input_name: images})
        return FusedOutputs(outputs[0], outputs[1], outputs[2] if feature_map else None)

    def run_router(self, images: np.ndarray) -> np.ndarray:
        """(N, 224, 224, 3) uint8 -> (N, P) body-part probabilities (split form)."""
        self._check(images)
        graph = self.graph
        assert isinstance(graph, SplitGraph)
        return self._sessions["router"].run([graph.body_part_probs], {self.input_name: images})[0]

    def run_specialist(
        self, part: str, images: np.ndarray, *, feature_map: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, 224, 224, 3) uint8 -> (N,) P(fractured) and optionally (N, 7, 7, 2048) (split form)."""
        self._check(images)
        graph = self.graph
        assert isinstance(graph, SplitGraph)
        names = [graph.p_fractured] + ([graph.feature_map] if feature_map else [])
        outputs = self._sessions[f"specialist/{part}"].run(names, {self.input_name: images})
        return outputs[0][:, 0], (outputs[1] if feature_map else None)

    def device_runner(self, images: np.ndarray, device: str = "cuda") -> Callable[[], None]:
        """A call that runs the graphs on `images` kept on the device, results left there (IOBinding).

        What one batch costs on an accelerator without host copies: the fused graph, or the router then one
        specialist (the first part's, as if every image were of it). `images` is copied to the device once.
        """
        self._check(images)
        graph = self.graph
        on_device = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(images), device, self.device_id)
        if isinstance(graph, FusedGraph):
            runs = [(self._sessions["fused"], [graph.body_part_probs, graph.p_fractured])]
        else:
            first = f"specialist/{self.body_parts[0]}"
            runs = [(self._sessions["router"], [graph.body_part_probs]), (self._sessions[first], [graph.p_fractured])]
        bindings = []
        for session, outputs in runs:
            binding = session.io_binding()
            binding.bind_ortvalue_input(self.input_name, on_device)
            for output in outputs:
                binding.bind_output(output, device, self.device_id)
            bindings.append((session, binding))

        def run() -> None:
            for session, binding in bindings:
                session.run_with_iobinding(binding)  # synchronous: returns once the device is done

        return run
