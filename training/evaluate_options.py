"""What `bfd evaluate` is asked to do, and the error it fails with: shared by the MURA and FracAtlas evaluations."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from training.splits import SplitMode


class EvaluationError(ValueError):
    """Nothing to evaluate, or data that does not fit the bundle."""


@dataclass(frozen=True)
class EvaluateOptions:
    data: Path
    bundle: Path
    out: Path
    split_file: Path | None = None  # the training run's split.csv (recommended); else the split is recomputed
    split: SplitMode = "patient"
    seed: int = 0
    batch_size: int = 16
    n_resamples: int = 1000
    providers: tuple[str, ...] | None = None
    progress: bool = True
    # FracAtlas only (see training.external):
    region_map: Mapping[str, str] | None = None  # FracAtlas region -> bundle part; None: the default table
    keep_mixed: bool = False  # films of several regions, left out by default
    examples: int = 6  # images in the localisation figure
