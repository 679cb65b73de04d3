"""What the core needs to know to run a bundle: the predictor's configuration, as plain data.

The HTTP service fills it from its settings (`service.settings.Settings.predictor_config`), the desktop and
`bfd predict` from their defaults; the core never reads the environment or a settings framework itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inference.dicom_objects.uids import DEFAULT_UID_ROOT
from inference.providers import default_intra_op_threads


@dataclass(frozen=True)
class PredictorConfig:
    """Engine, batching, admission, memory and answer settings; the defaults are the service's."""

    providers: list[str] = field(default_factory=lambda: ["auto"])
    intra_op_threads: int | None = None  # onnxruntime threads (default: every core this process may use)
    decode_threads: int | None = None  # decode pool (default: every core)
    decode_processes: int | None = None  # codec workers for compressed DICOM (default: decode threads; 0: none)
    ort_spinning: bool = False
    max_batch_size: int = 16
    max_wait_ms: float = 0.0
    max_queue_wait_ms: float | None = 700.0
    max_queue_size: int = 256
    max_pixels: int = 50_000_000
    max_image_decode_bytes: int = 400_000_000
    decode_memory_budget_bytes: int = 800_000_000
    request_memory_budget_bytes: int = 300_000_000
    heatmap_max_side: int = 512
    abstain_min_router_probability: float | None = None
    abstain_max_colourfulness: float | None = None
    dicom_uid_root: str = DEFAULT_UID_ROOT  # new UIDs of DICOM outputs are under it (output=dicom)

    def resolved_intra_op_threads(self) -> int:
        return self.intra_op_threads or default_intra_op_threads()

    def resolved_decode_threads(self) -> int:
        # Decoding (Pillow releases the GIL) and inference share the cores: the decode pool is as wide as the
        # machine so bursts decode in parallel, while the one inference thread keeps batches flowing.
        return self.decode_threads or default_intra_op_threads()

    def resolved_decode_processes(self) -> int:
        return self.resolved_decode_threads() if self.decode_processes is None else self.decode_processes
