"""Head training on features, and the content-keyed feature cache, with small real Keras models."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras  # noqa: E402
from factories import encode_png  # noqa: E402

from training.features import FeatureCache, backbone_fingerprint, extract_features  # noqa: E402
from training.heads import FlipAugmentedFeatures, HeadConfig, TrainingError, predict_head, train_head  # noqa: E402
from training.records import ImageRecord  # noqa: E402

pytestmark = pytest.mark.slow


def _separable(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, 2, 2048) features whose first 16 dims carry the class; both views agree on it."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=count)
    features = rng.normal(0, 1, size=(count, 2, 2048)).astype(np.float32)
    features[:, :, :16] += (labels[:, None, None] * 2 - 1) * 3.0
    return features, labels


def test_head_learns_separable_features_and_restores_the_best_epoch() -> None:
    train_x, train_y = _separable(256, seed=1)
    val_x, val_y = _separable(64, seed=2)
    trained = train_head("demo", ["a", "b"], train_x, train_y, val_x, val_y, HeadConfig(max_epochs=25, patience=3))
    accuracy = np.mean(np.argmax(predict_head(trained.head, val_x[:, 0]), axis=1) == val_y)
    assert accuracy > 0.95
    losses = trained.history["val_loss"]
    assert trained.best_epoch == int(np.argmin(losses)) + 1
    assert trained.epochs_run == len(losses) <= 25
    # the restored weights are the best epoch's: re-evaluating gives that epoch's val_loss
    evaluated = trained.head.evaluate(val_x[:, 0], keras.utils.to_categorical(val_y, 2), verbose=0)[0]
    assert evaluated == pytest.approx(min(losses), rel=1e-4)
    # the head is the system's: 2048 -> 128 -> 50 -> n
    assert [layer.units for layer in trained.head.layers] == [128, 50, 2]


def test_early_stopping_stops_after_patience_when_validation_stops_improving() -> None:
    train_x, train_y = _separable(128, seed=3)
    val_x = np.random.default_rng(4).normal(size=(32, 2, 2048)).astype(np.float32)
    val_y = np.random.default_rng(5).integers(0, 2, size=32)  # labels unrelated to features: val_loss rises
    trained = train_head("noise", ["a", "b"], train_x, train_y, val_x, val_y, HeadConfig(max_epochs=25, patience=3))
    assert trained.epochs_run < 25
    assert trained.epochs_run - trained.best_epoch == 3


def test_flip_augmentation_draws_both_views_and_keeps_targets_aligned() -> None:
    features = np.zeros((200, 2, 4), dtype=np.float32)
    features[:, 1] = 1.0  # view 1 (flipped) marked by ones
    features[:, :, 1] = np.arange(200)[:, None]  # sample id in column 1
    targets = keras.utils.to_categorical(np.arange(200) % 2, 2)
    batches = FlipAugmentedFeatures(features, targets, batch_size=64, flip=True, seed=0)
    seen = np.concatenate([batches[i][0] for i in range(len(batches))])
    seen_targets = np.concatenate([batches[i][1] for i in range(len(batches))])
    assert sorted(seen[:, 1].astype(int).tolist()) == list(range(200))  # every sample once per epoch
    assert 0.3 < seen[:, 0].mean() < 0.7  # both views drawn
    assert np.array_equal(seen_targets[:, 1], seen[:, 1].astype(int) % 2)  # targets follow their samples
    plain = FlipAugmentedFeatures(features, targets, batch_size=64, flip=False, seed=0)
    assert np.all(np.concatenate([plain[i][0] for i in range(len(plain))])[:, 0] == 0)


def test_a_single_class_or_no_validation_is_refused() -> None:
    x, _ = _separable(10, seed=6)
    with pytest.raises(TrainingError, match="single class"):
        train_head("one", ["a", "b"], x, np.zeros(10, dtype=int), x, np.zeros(10, dtype=int), HeadConfig())
    with pytest.raises(TrainingError, match="no validation"):
        train_head("none", ["a", "b"], x, np.arange(10) % 2, x[:0], np.zeros(0, dtype=int), HeadConfig())


def _tiny_extractor() -> keras.Model:
    """uint8 image -> (N, 2048): small but real, and sensitive to left-right order."""
    keras.utils.set_random_seed(0)
    image = keras.Input(shape=(224, 224, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(image)
    x = keras.layers.AveragePooling2D(28)(x)  # (8, 8, 3): keeps where things are
    x = keras.layers.Flatten()(x)
    return keras.Model(image, keras.layers.Dense(2048)(x))


def _asymmetric_png(seed: int, size: int = 160) -> bytes:
    """A grey PNG brighter on the left than on the right, with noise: its mirror image differs."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(255, 0, size)[None, :].repeat(size, axis=0)
    return encode_png(np.clip(ramp * 0.7 + rng.integers(0, 70, size=(size, size)), 0, 255).astype(np.uint8))


def _record(path: Path, root: Path) -> ImageRecord:
    return ImageRecord(
        path=path,
        relative_path=path.relative_to(root).as_posix(),
        part="hand",
        patient="patient00001",
        study="hand/patient00001/study1",
        label=1,
        origin=None,
    )


def test_cache_computes_each_content_once_skips_unreadable_and_is_reused(tmp_path: Path) -> None:
    extractor = _tiny_extractor()
    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for index in range(3):
        paths.append(images / f"{index}.png")
        paths[-1].write_bytes(_asymmetric_png(index))
    (images / "copy.png").write_bytes(paths[0].read_bytes())  # same content as 0.png: computed once
    (images / "broken.png").write_bytes(b"not an image at all")
    records = [_record(p, images) for p in [*paths, images / "copy.png", images / "broken.png"]]
    records.append(replace(records[0], path=images / "missing.png", relative_path="missing.png"))
    cache = FeatureCache(tmp_path / "cache")

    first = extract_features(records, extractor, cache, batch_size=2, progress=False)
    assert first.computed == 4
    assert first.reused == 0
    assert set(first.skipped) == {"broken.png", "missing.png"}
    assert len(list(cache.directory.rglob("*.npy"))) == 3  # one entry per distinct content
    assert np.array_equal(first.features["copy.png"], first.features["0.png"])
    # row 1 is the mirror image's features: equal to running the extractor on the flipped pixels
    from inference.preprocessing import prepare_image_file

    pixels = prepare_image_file(paths[1]).pixels
    expected = extractor.predict_on_batch(np.stack([pixels, pixels[:, ::-1]]))
    np.testing.assert_allclose(first.features["1.png"], expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(first.features["1.png"][0], first.features["1.png"][1])

    second = extract_features(records, extractor, cache, batch_size=2, progress=False)
    assert second.computed == 0
    assert second.reused == 4
    for key, value in first.features.items():
        assert np.array_equal(second.features[key], value)


def test_damaged_cache_entry_is_recomputed(tmp_path: Path) -> None:
    extractor = _tiny_extractor()
    path = tmp_path / "a.png"
    path.write_bytes(_asymmetric_png(7, size=120))
    records = [_record(path, tmp_path)]
    cache = FeatureCache(tmp_path / "cache")
    first = extract_features(records, extractor, cache, progress=False)
    entry = next(cache.directory.rglob("*.npy"))
    entry.write_bytes(b"garbage")
    again = extract_features(records, extractor, cache, progress=False)
    assert again.computed == 1
    assert np.array_equal(again.features["a.png"], first.features["a.png"])


def test_fingerprint_follows_the_weights() -> None:
    first, second = _tiny_extractor(), _tiny_extractor()
    assert backbone_fingerprint(first) == backbone_fingerprint(second)  # same seed, same weights
    kernel = second.layers[-1].kernel
    kernel.assign(kernel.numpy() + 1.0)
    assert backbone_fingerprint(first) != backbone_fingerprint(second)
    cache_root = Path("cache")
    assert FeatureCache.for_backbone(cache_root, backbone_fingerprint(first), "bilinear") != FeatureCache.for_backbone(
        cache_root, backbone_fingerprint(first), "nearest"
    )
