"""PNG figures for training runs and evaluation reports (matplotlib, headless Agg backend; no TensorFlow)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_history(history: Mapping[str, Sequence[float]], title: str, path: Path, best_epoch: int | None = None) -> Path:
    """Accuracy and loss per epoch, training vs validation, with the restored epoch marked."""
    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for axis, metric in ((accuracy_axis, "accuracy"), (loss_axis, "loss")):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            if key in history:
                axis.plot(epochs, history[key], marker="o", label=label)
        if best_epoch is not None:
            axis.axvline(best_epoch, color="grey", linestyle="--", label=f"restored (epoch {best_epoch})")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    points: Mapping[str, Mapping[str, tuple[float, float]]],
    title: str,
    path: Path,
) -> Path:
    """ROC curves (name -> (fpr, tpr)) with operating points (name -> label -> (fpr, tpr))."""
    figure, axis = plt.subplots(figsize=(5.5, 5.5))
    axis.plot([0, 1], [0, 1], color="lightgrey", linestyle=":")
    for name, (fpr, tpr) in curves.items():
        (line,) = axis.plot(fpr, tpr, label=name)
        for label, (x, y) in points.get(name, {}).items():
            axis.plot([x], [y], marker="o", color=line.get_color())
            axis.annotate(label, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7)
    axis.set_xlabel("1 - specificity")
    axis.set_ylabel("sensitivity")
    axis.set_xlim(-0.01, 1.01)
    axis.set_ylim(-0.01, 1.01)
    axis.set_title(title)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_confusions(matrices: Mapping[str, tuple[np.ndarray, Sequence[str]]], title: str, path: Path) -> Path:
    """One panel per confusion matrix (name -> (matrix rows=true cols=predicted, labels))."""
    count = max(1, len(matrices))
    figure, axes = plt.subplots(1, count, figsize=(4 * count, 4), squeeze=False)
    for axis, (name, (matrix, labels)) in zip(axes[0], matrices.items(), strict=False):
        matrix = np.asarray(matrix)
        axis.imshow(matrix, cmap="Blues")
        for (row, column), value in np.ndenumerate(matrix):
            colour = "white" if value > matrix.max() / 2 else "black"
            axis.text(column, row, str(value), ha="center", va="center", color=colour)
        axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        axis.set_yticks(range(len(labels)), labels)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(name)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct score, highest threshold first, starting at (0, 0)."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    positives = max(1, int(np.sum(labels == 1)))
    negatives = max(1, int(np.sum(labels == 0)))
    thresholds = np.unique(scores)[::-1]
    tpr = np.array([0.0] + [np.sum((scores >= t) & (labels == 1)) / positives for t in thresholds])
    fpr = np.array([0.0] + [np.sum((scores >= t) & (labels == 0)) / negatives for t in thresholds])
    return fpr, tpr
