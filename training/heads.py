"""Training one head (Dense 128 -> 50 -> n) on cached pooled features, exactly as the system specifies.

Adam 1e-4, categorical cross-entropy, at most 25 epochs of batch 64, early stopping on val_loss with
patience 3 restoring the best weights. Horizontal-flip augmentation: each epoch every training image is
seen once, as served or mirrored at random (both views' features are in the cache). Validation uses the
images as served, never mirrored.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import keras
import numpy as np

from training.architecture import HEAD_NAME, build_head, compile_for_training

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadConfig:
    max_epochs: int = 25
    batch_size: int = 64
    patience: int = 3
    flip: bool = True
    seed: int = 0


class TrainingError(ValueError):
    """The data cannot train this head (no validation images, a single class, ...)."""


@dataclass
class TrainedHead:
    head: keras.Model
    history: dict[str, list[float]]
    best_epoch: int  # 1-based epoch whose weights were restored
    epochs_run: int
    train_images: int
    val_images: int
    class_counts: dict[str, int] = field(default_factory=dict)


class FlipAugmentedFeatures(keras.utils.PyDataset):
    """Batches of (features, one-hot) where each sample's view (as served / flipped) is drawn per epoch."""

    def __init__(self, features: np.ndarray, targets: np.ndarray, *, batch_size: int, flip: bool, seed: int) -> None:
        super().__init__()
        self._features = features  # (N, 2, 2048)
        self._targets = targets  # (N, n_classes)
        self._batch_size = batch_size
        self._flip = flip
        self._rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self._features) / self._batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._order[index * self._batch_size : (index + 1) * self._batch_size]
        return self._features[rows, self._views[rows]], self._targets[rows]

    def on_epoch_end(self) -> None:
        count = len(self._features)
        self._order = self._rng.permutation(count)
        self._views = self._rng.integers(0, 2, size=count) if self._flip else np.zeros(count, dtype=np.int64)


def train_head(
    name: str,
    class_names: list[str],
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    config: HeadConfig,
) -> TrainedHead:
    """Fit a fresh head: features (N, 2, 2048) float32 with labels (N,) class indices -> TrainedHead."""
    n_classes = len(class_names)
    if len(train_features) == 0:
        raise TrainingError(f"{name}: no training images")
    if len(val_features) == 0:
        raise TrainingError(f"{name}: no validation images; early stopping on val_loss needs some (more patients)")
    present = sorted(set(np.asarray(train_labels).tolist()))
    counts = {class_names[i]: int(np.sum(train_labels == i)) for i in range(n_classes)}
    if len(present) < 2:
        raise TrainingError(f"{name}: the training split holds a single class {counts}; a classifier needs both")
    keras.utils.set_random_seed(config.seed)
    head = compile_for_training(build_head(n_classes, name=HEAD_NAME))
    batches = FlipAugmentedFeatures(
        train_features,
        keras.utils.to_categorical(train_labels, n_classes),
        batch_size=config.batch_size,
        flip=config.flip,
        seed=config.seed,
    )
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True)
    fitted = head.fit(
        batches,
        validation_data=(val_features[:, 0], keras.utils.to_categorical(val_labels, n_classes)),
        epochs=config.max_epochs,
        callbacks=[stopper],
        verbose=0,
    )
    history = {key: [float(v) for v in values] for key, values in fitted.history.items()}
    best_epoch = int(np.argmin(history["val_loss"])) + 1
    log.info(
        "%s: %d epochs, best val_loss %.4f at epoch %d",
        name,
        len(history["loss"]),
        min(history["val_loss"]),
        best_epoch,
    )
    return TrainedHead(
        head=head,
        history=history,
        best_epoch=best_epoch,
        epochs_run=len(history["loss"]),
        train_images=len(train_features),
        val_images=len(val_features),
        class_counts=counts,
    )


def predict_head(head: keras.Model, features: np.ndarray) -> np.ndarray:
    """(N, 2048) float32 -> (N, n_classes) probabilities."""
    if len(features) == 0:
        return np.zeros((0, head.outputs[0].shape[-1]), dtype=np.float32)
    # A direct call, not `predict`: no tf.function is traced per head (and no retracing warnings).
    return np.asarray(head(features, training=False), dtype=np.float32)
