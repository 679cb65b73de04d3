"""Grad-CAM heatmaps for the fracture specialists, in numpy at serving time (no TensorFlow, no extra graph).

A specialist's head is global average pooling then a small MLP (Dense 128 relu -> Dense 50 relu -> Dense 2).
So the gradient of the pre-softmax 'fractured' score with respect to the last conv block's map A (7, 7, 2048)
is the gradient with respect to the pooled vector divided by 49, identical at every position; Grad-CAM's
channel weights are its spatial mean, i.e. d score / d pooled / 49. We back-propagate through the MLP with
the head weights the export saved (`heads.npz`) and apply the weights to the feature map the bundle's graph
returns. Requests that ask for no heatmap never fetch the map nor run any of this.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FRACTURED = 0  # class index of 'fractured' in every specialist
OVERLAY_ALPHA = 0.45


@dataclass(frozen=True)
class HeadWeights:
    """The Dense layers of one head, input side first: (kernel (in, out), bias (out,))."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]


class HeadBank:
    """Every head's weights from a bundle's heads.npz ('<model>/<i>/kernel|bias')."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._arrays = {key: np.asarray(value, dtype=np.float64) for key, value in arrays.items()}

    @classmethod
    def load(cls, path: Path) -> HeadBank:
        with np.load(path, allow_pickle=False) as archive:
            return cls({key: archive[key] for key in archive.files})

    def head(self, model: str) -> HeadWeights:
        layers = []
        index = 0
        while f"{model}/{index}/kernel" in self._arrays:
            layers.append((self._arrays[f"{model}/{index}/kernel"], self._arrays[f"{model}/{index}/bias"]))
            index += 1
        if not layers:
            raise KeyError(f"heads file has no weights for {model!r}")
        return HeadWeights(tuple(layers))

    def specialist(self, part: str) -> HeadWeights:
        return self.head(f"specialist/{part}")


def score_gradient(head: HeadWeights, pooled: np.ndarray, class_index: int = FRACTURED) -> np.ndarray:
    """d (pre-softmax score of `class_index`) / d pooled features: (2048,) -> (2048,)."""
    activations = [np.asarray(pooled, dtype=np.float64)]
    pre_activations = []
    for kernel, bias in head.layers[:-1]:
        pre = activations[-1] @ kernel + bias
        pre_activations.append(pre)
        activations.append(np.maximum(pre, 0.0))
    gradient = head.layers[-1][0][:, class_index]  # d score / d last hidden activation
    for (kernel, _), pre in zip(reversed(head.layers[:-1]), reversed(pre_activations), strict=True):
        gradient = kernel @ (gradient * (pre > 0.0))
    return gradient


def grad_cam(feature_map: np.ndarray, head: HeadWeights, class_index: int = FRACTURED) -> np.ndarray:
    """(7, 7, 2048) feature map -> (7, 7) Grad-CAM in [0, 1] (all zeros when nothing argues for the class)."""
    fmap = np.asarray(feature_map, dtype=np.float64)
    cells = fmap.shape[0] * fmap.shape[1]
    weights = score_gradient(head, fmap.mean(axis=(0, 1)), class_index) / cells
    cam = np.maximum(np.tensordot(fmap, weights, axes=([2], [0])), 0.0)
    peak = float(cam.max())
    return cam / peak if peak > 0 else cam


def _colour_map(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB float in [0, 1]: blue -> cyan -> yellow -> red ('jet'-like)."""
    v = np.clip(values, 0.0, 1.0)[..., None]  # keeps the input's float type
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.concatenate([red, green, blue], axis=-1)


def overlay(display: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Grey (H, W) uint8 image + (h, w) map in [0, 1] -> (H, W, 3) uint8, the map stretched over the image."""
    height, width = display.shape
    stretched = Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    heat = np.clip(np.asarray(stretched, dtype=np.float32), 0.0, 1.0)  # float32: a picture; 5 ms, not 17 (512 px)
    grey = display[..., None].astype(np.float32) * np.float32(1.0 / 255.0)  # broadcast over RGB, not repeated
    alpha = np.float32(OVERLAY_ALPHA) * heat[..., None]  # strong where the model looks, the radiograph elsewhere
    blended = (1.0 - alpha) * grey + alpha * _colour_map(heat)
    return np.rint(blended * 255.0).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()
