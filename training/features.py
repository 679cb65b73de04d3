"""Pooled backbone features, computed once per image and its mirror image, cached on disk by file content.

The backbone is frozen, so every head (router and specialists, every epoch, every rerun) can train on the
same (2, 2048) vector per image: row 0 for the image as served, row 1 for its horizontal flip (the
augmentation). A whole training run then costs one backbone pass over the data plus seconds per head.

The cache is keyed by the sha256 of the image file's bytes, inside a folder named after the backbone's
weights fingerprint and the resize method, so a different backbone or preprocessing never reuses stale
features. Entries are written atomically (temporary file, then rename): an interrupted run leaves only
whole entries behind and the next run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from tqdm import tqdm

from inference.preprocessing import ImageError, ResizeMethod, prepare_image
from training.architecture import FEATURE_DIM, IMAGE_SIZE, PREPROCESSING_NAME, CaffePreprocessing
from training.records import ImageRecord

log = logging.getLogger(__name__)

VIEWS = 2  # the image as served, and its horizontal flip
DEFAULT_BATCH_SIZE = 32


def default_cache_root() -> Path:
    """$BFD_CACHE_DIR, else $XDG_CACHE_HOME/bfd/features, else ~/.cache/bfd/features."""
    if explicit := os.environ.get("BFD_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bfd" / "features"


def backbone_fingerprint(backbone: keras.Model) -> str:
    """sha256 over the backbone's weights (shapes and bytes): equal weights give equal fingerprints."""
    digest = hashlib.sha256()
    for weight in backbone.weights:
        array = np.ascontiguousarray(np.asarray(weight))
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class FeatureCache:
    """One folder of `<sha[:2]>/<sha>.npy` entries, each (2, 2048) float32, for one backbone + resize."""

    directory: Path

    @classmethod
    def for_backbone(cls, root: Path, fingerprint: str, resize: ResizeMethod) -> FeatureCache:
        return cls(Path(root) / f"{fingerprint[:16]}-{resize}")

    def path_for(self, digest: str) -> Path:
        return self.directory / digest[:2] / f"{digest}.npy"

    def load(self, digest: str) -> np.ndarray | None:
        path = self.path_for(digest)
        if not path.is_file():
            return None
        try:
            features = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:  # a damaged entry is recomputed, not trusted
            log.warning("feature cache entry %s unreadable (%s): recomputing", path, error)
            return None
        return features if features.shape == (VIEWS, FEATURE_DIM) else None

    def store(self, digest: str, features: np.ndarray) -> None:
        path = self.path_for(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with temporary.open("wb") as handle:
            np.save(handle, features.astype(np.float32, copy=False), allow_pickle=False)
        os.replace(temporary, path)


@dataclass
class ExtractionResult:
    """Features per record (by relative path) and what it took to get them."""

    features: dict[str, np.ndarray]  # relative_path -> (2, 2048) float32: [as served, flipped]
    computed: int = 0  # images run through the backbone in this call (each twice: as served and flipped)
    reused: int = 0  # images whose features came from the cache
    skipped: dict[str, str] = field(default_factory=dict)  # relative_path -> why it could not be read
    compute_seconds: float = 0.0  # decode + backbone time of the computed images

    @property
    def images_per_second(self) -> float | None:
        """Computed images per second, each image counting its two backbone passes."""
        return self.computed / self.compute_seconds if self.computed and self.compute_seconds > 0 else None

    def summary(self) -> dict[str, object]:
        return {
            "images": len(self.features),
            "computed": self.computed,
            "reused": self.reused,
            "skipped": len(self.skipped),
            "compute_seconds": round(self.compute_seconds, 2),
            "images_per_second": None if self.images_per_second is None else round(self.images_per_second, 2),
        }


def feature_extractor(backbone: keras.Model) -> keras.Model:
    """(N, 224, 224, 3) uint8 -> (N, 2048) pooled features: the same preprocessing layer the models use."""
    image = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8", name="image")
    features = backbone(CaffePreprocessing(name=PREPROCESSING_NAME)(image), training=False)
    return keras.Model(image, features, name="feature_extractor")


def _read(record: ImageRecord) -> tuple[bytes | None, str | None]:
    try:
        return record.path.read_bytes(), None
    except OSError as error:
        return None, f"cannot be read: {error.strerror or error}"


def _decode(data: bytes, resize: ResizeMethod) -> tuple[np.ndarray | None, str | None]:
    try:
        return prepare_image(data, resize=resize).pixels, None
    except ImageError as error:
        return None, error.reason


def extract_features(
    records: Sequence[ImageRecord],
    extractor: keras.Model,
    cache: FeatureCache,
    *,
    resize: ResizeMethod = "bilinear",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> ExtractionResult:
    """Features for every readable record, from the cache where present; unreadable files are skipped and listed."""
    result = ExtractionResult(features={})
    pending: dict[str, list[ImageRecord]] = {}  # digest -> records with that content (duplicates run once)
    payloads: dict[str, bytes] = {}
    for record in tqdm(records, desc="hashing", unit="img", disable=not progress, leave=False):
        data, reason = _read(record)
        if data is None:
            result.skipped[record.relative_path] = reason or "unreadable"
            continue
        digest = hashlib.sha256(data).hexdigest()
        cached = cache.load(digest)
        if cached is not None:
            result.features[record.relative_path] = cached
            result.reused += 1
            continue
        pending.setdefault(digest, []).append(record)
        payloads[digest] = data
    digests = list(pending)
    started = time.perf_counter()
    with (
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode") as pool,
        tqdm(total=len(digests), desc="features", unit="img", disable=not progress) as bar,
    ):
        for start in range(0, len(digests), batch_size):
            chunk = digests[start : start + batch_size]
            decoded = list(pool.map(lambda d: _decode(payloads.pop(d), resize), chunk))
            good = [(d, pixels) for d, (pixels, _) in zip(chunk, decoded, strict=True) if pixels is not None]
            for d, (pixels, reason) in zip(chunk, decoded, strict=True):
                if pixels is None:
                    for record in pending[d]:
                        result.skipped[record.relative_path] = reason or "undecodable"
            if good:
                images = np.stack([pixels for _, pixels in good])
                both = np.concatenate([images, images[:, :, ::-1, :]])  # horizontal flip: reverse the width axis
                pooled = np.asarray(extractor.predict_on_batch(both), dtype=np.float32)
                for row, (digest, _) in enumerate(good):
                    features = np.stack([pooled[row], pooled[len(good) + row]])
                    cache.store(digest, features)
                    for record in pending[digest]:
                        result.features[record.relative_path] = features
                        result.computed += 1
            bar.update(len(chunk))
    result.compute_seconds = time.perf_counter() - started
    for path, reason in result.skipped.items():
        log.warning("skipped %s: %s", path, reason)
    return result
