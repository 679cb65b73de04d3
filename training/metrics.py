"""Clinical metrics for a binary fracture classifier, with the confidence intervals that make them reportable.

This module owns the numbers `bfd evaluate` publishes: the confusion counts, sensitivity / specificity / accuracy
with Wilson intervals, AUROC and Cohen's kappa with patient-level (cluster) bootstrap intervals, and the two
operating-point rules (high-sensitivity and high-specificity thresholds).

Conventions, shared by every function here:

* `y_true` holds ints, 1 = positive = fractured (MURA 'abnormal'), 0 = normal;
* scores are P(fractured); a prediction is positive iff `score >= threshold` (as `sklearn.metrics.roc_curve`);
* a metric that is undefined on the data (no positives, one class, ...) is `None`, never NaN or 0.

It depends on numpy and the standard library only, so evaluation runs without TensorFlow, scikit-learn or scipy;
the tests cross-check it against the latter two.  MURA's published kappa interval is deliberately not used
(its formula puts the variance where the standard error belongs); the bootstrap over patients is the interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

# Absorbs float fuzz when a target rate becomes a count (0.7 * 10 == 7.000000000000001 must still mean 7).
_COUNT_EPS = 1e-9
FRACTURE_LABELS = ("fractured", "normal")


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% interval; every field is None when the quantity is undefined on the data."""

    value: float | None
    low: float | None
    high: float | None
    method: str
    numerator: int | None = None
    denominator: int | None = None

    def as_dict(self) -> dict[str, float | int | str | None]:
        """JSON-ready form for evaluation reports."""
        return {
            "value": self.value,
            "low": self.low,
            "high": self.high,
            "method": self.method,
            "numerator": self.numerator,
            "denominator": self.denominator,
        }


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


@dataclass(frozen=True)
class BinaryConfusion:
    """Counts at one threshold, positive = fractured; the rates are None when their denominator is 0."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def sensitivity(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float | None:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def accuracy(self) -> float | None:
        return _ratio(self.tp + self.tn, self.tp + self.fp + self.tn + self.fn)

    @property
    def ppv(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float | None:
        return _ratio(self.tn, self.tn + self.fn)

    def as_matrix(self) -> list[list[int]]:
        """Rows are the truth (fractured, normal), columns the prediction (fractured, normal): positive first."""
        return [[self.tp, self.fn], [self.fp, self.tn]]


# --------------------------------------------------------------------------------------------------- validation


def _vector(values: npt.ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def _binary(values: npt.ArrayLike, name: str) -> np.ndarray:
    """0/1 labels as int64; anything else is a caller bug (e.g. 'normal' encoded as 1) and must not pass silently."""
    array = _vector(values, name)
    if array.size and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0 and 1, got {np.unique(array)[:10].tolist()}")
    return array.astype(np.int64)


def _scores(values: npt.ArrayLike) -> np.ndarray:
    array = _vector(values, "scores").astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("scores must be finite")
    return array


def _same_length(*arrays: np.ndarray) -> None:
    if len({len(array) for array in arrays}) > 1:
        raise ValueError(f"inputs differ in length: {[len(array) for array in arrays]}")


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _check_target(target: float) -> None:
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target must be in [0, 1], got {target}")


def _required_count(target: float, total: int) -> int:
    """The fewest of `total` that reach rate `target`, robust to float fuzz in `target * total`."""
    return max(0, math.ceil(target * total - _COUNT_EPS))


# -------------------------------------------------------------------------------------------------- proportions


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval: unlike the Wald interval it stays inside [0, 1] and behaves at 0% and 100%."""
    _check_confidence(confidence)
    if not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total, got {successes}/{total}")
    if total == 0:
        return None
    z = NormalDist().inv_cdf(0.5 + 0.5 * confidence)
    p = successes / total
    denom = 2 * (total + z * z)
    center = (2 * total * p + z * z) / denom
    delta = z / denom * math.sqrt(4 * total * p * (1 - p) + z * z)
    # At the edges the bounds are exactly 0 / 1; the formula would give them up to rounding.
    low = 0.0 if successes == 0 else max(0.0, center - delta)
    high = 1.0 if successes == total else min(1.0, center + delta)
    return low, high


def proportion(successes: int, total: int, confidence: float = 0.95) -> Estimate:
    """A rate with its Wilson interval, keeping the counts so a reader can see how much data stands behind it."""
    interval = wilson_interval(successes, total, confidence)
    if interval is None:
        return Estimate(None, None, None, "none", successes, total)
    return Estimate(successes / total, interval[0], interval[1], "wilson", successes, total)


# ------------------------------------------------------------------------------------------ confusion and kappa


def binary_confusion(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> BinaryConfusion:
    """Counts of 0/1 predictions against 0/1 truth, positive = 1 = fractured."""
    truth, pred = _binary(y_true, "y_true"), _binary(y_pred, "y_pred")
    _same_length(truth, pred)
    tp = int(np.count_nonzero((truth == 1) & (pred == 1)))
    fp = int(np.count_nonzero((truth == 0) & (pred == 1)))
    tn = int(np.count_nonzero((truth == 0) & (pred == 0)))
    fn = int(np.count_nonzero((truth == 1) & (pred == 0)))
    return BinaryConfusion(tp=tp, fp=fp, tn=tn, fn=fn)


def confusion_matrix(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts, rows true and columns predicted, for labels 0 .. n_classes - 1."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    truth, pred = _vector(y_true, "y_true"), _vector(y_pred, "y_pred")
    _same_length(truth, pred)
    for name, array in (("y_true", truth), ("y_pred", pred)):
        if array.size and (not np.array_equal(array, np.round(array)) or array.min() < 0 or array.max() >= n_classes):
            raise ValueError(f"{name} must hold integer labels in [0, {n_classes}), got {np.unique(array)[:10]}")
    flat = truth.astype(np.int64) * n_classes + pred.astype(np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes).astype(np.int64)


def cohen_kappa(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float | None:
    """Agreement beyond chance (unweighted); None when chance agreement is already total, e.g. one label only."""
    truth, pred = _vector(y_true, "y_true"), _vector(y_pred, "y_pred")
    _same_length(truth, pred)
    n = len(truth)
    if n == 0:
        return None
    labels, codes = np.unique(np.concatenate([truth, pred]), return_inverse=True)
    k = len(labels)
    matrix = np.bincount(codes[:n] * k + codes[n:], minlength=k * k).reshape(k, k)
    # Integer arithmetic: kappa = (n * agreed - chance) / (n^2 - chance), chance = sum(row_i * col_i).
    agreed = int(np.trace(matrix))
    chance = sum(int(r) * int(c) for r, c in zip(matrix.sum(axis=1), matrix.sum(axis=0), strict=True))
    if chance == n * n:
        return None
    return (n * agreed - chance) / (n * n - chance)


# ------------------------------------------------------------------------------------------------------- AUROC


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (what the Mann-Whitney U statistic needs)."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> float | None:
    """P(score of a random fractured > a random normal), ties counting half; None unless both classes occur."""
    truth, values = _binary(y_true, "y_true"), _scores(scores)
    _same_length(truth, values)
    positives = int(truth.sum())
    negatives = len(truth) - positives
    if positives == 0 or negatives == 0:
        return None
    rank_sum = float(_average_ranks(values)[truth == 1].sum())
    u = rank_sum - positives * (positives + 1) / 2.0
    return u / (positives * negatives)


# --------------------------------------------------------------------------------------------------- bootstrap


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float | None],
    groups: Sequence[Hashable],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile interval from resampling patients, not images: a patient's studies are correlated, so resampling
    images alone would understate the uncertainty.

    `groups[i]` is the patient of sample i.  Each resample draws as many patients as there are, with replacement,
    and calls `statistic` with all their sample indices.  Resamples where it returns None (or NaN) are skipped;
    if fewer than half give a value the interval is None.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    ids: dict[Hashable, int] = {}
    codes = np.fromiter((ids.setdefault(group, len(ids)) for group in groups), dtype=np.int64, count=len(groups))
    n_groups = len(ids)
    if n_groups == 0:
        return None
    order = np.argsort(codes, kind="mergesort")  # sample indices, patient by patient
    sizes = np.bincount(codes, minlength=n_groups)
    starts = np.cumsum(sizes) - sizes  # where each patient's block begins in `order`

    rng = np.random.default_rng(seed)
    values: list[float] = []
    for _ in range(n_resamples):
        chosen = rng.integers(0, n_groups, size=n_groups)
        lengths = sizes[chosen]
        block_starts = np.cumsum(lengths) - lengths
        within = np.arange(int(lengths.sum())) - np.repeat(block_starts, lengths)
        value = statistic(order[np.repeat(starts[chosen], lengths) + within])
        if value is not None and math.isfinite(value):
            values.append(float(value))
    if 2 * len(values) < n_resamples:
        return None
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(values), [tail, 1.0 - tail])
    return float(low), float(high)


# -------------------------------------------------------------------------------------------- operating points


def _scored_classes(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    truth, values = _binary(y_true, "y_true"), _scores(scores)
    _same_length(truth, values)
    return truth, values


def high_sensitivity_threshold(y_true: npt.ArrayLike, scores: npt.ArrayLike, target: float = 0.90) -> float | None:
    """The highest observed score t whose sensitivity (positives with score >= t) reaches `target`: a rule-out
    operating point that misses at most 1 - target of fractures while flagging as few normals as it can.
    None when there are no positives."""
    _check_target(target)
    truth, values = _scored_classes(y_true, scores)
    positives = np.sort(values[truth == 1])[::-1]
    if positives.size == 0:
        return None
    needed = _required_count(target, positives.size)
    # The needed-th highest positive score keeps `needed` positives; any higher observed score keeps fewer.
    return float(values.max()) if needed == 0 else float(positives[needed - 1])


def high_specificity_threshold(y_true: npt.ArrayLike, scores: npt.ArrayLike, target: float = 0.90) -> float | None:
    """The lowest observed score t whose specificity (normals with score < t) reaches `target`: a rule-in operating
    point.  If no observed score is high enough, the float just above the top score (everything negative).
    None when there are no negatives."""
    _check_target(target)
    truth, values = _scored_classes(y_true, scores)
    negatives = np.sort(values[truth == 0])
    if negatives.size == 0:
        return None
    needed = _required_count(target, negatives.size)
    if needed == 0:
        return float(values.min())
    # t must lie strictly above the needed-th lowest normal score; the lowest observed such t is the answer.
    above = values[values > negatives[needed - 1]]
    if above.size == 0:
        return float(np.nextafter(values.max(), np.inf))
    return float(above.min())


# ------------------------------------------------------------------------------------------------------ report


def binary_report(
    y_true: npt.ArrayLike,
    scores: npt.ArrayLike,
    threshold: float,
    groups: Sequence[Hashable],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything a reader needs about the classifier at `threshold`, JSON-ready: counts, Wilson intervals for the
    rates, and patient-bootstrap intervals for AUROC and kappa (`groups[i]` is the patient of sample i)."""
    truth, values = _scored_classes(y_true, scores)
    if len(groups) != len(truth):
        raise ValueError(f"groups has {len(groups)} entries for {len(truth)} samples")
    predicted = (values >= threshold).astype(np.int64)
    counts = binary_confusion(truth, predicted)
    method = f"patient bootstrap ({n_resamples} resamples)"

    def bootstrapped(point: float | None, statistic: Callable[[np.ndarray], float | None]) -> Estimate:
        if point is None:
            return Estimate(None, None, None, "none")
        interval = bootstrap_interval(statistic, groups, n_resamples=n_resamples, seed=seed)
        if interval is None:
            return Estimate(point, None, None, "none")
        return Estimate(point, interval[0], interval[1], method)

    positives = counts.tp + counts.fn
    negatives = counts.tn + counts.fp
    return {
        "n": len(truth),
        "positives": positives,
        "negatives": negatives,
        "patients": len(set(groups)),
        "threshold": float(threshold),
        "confusion": {
            "tp": counts.tp,
            "fp": counts.fp,
            "tn": counts.tn,
            "fn": counts.fn,
            "matrix": counts.as_matrix(),
            "labels": list(FRACTURE_LABELS),
        },
        "accuracy": proportion(counts.tp + counts.tn, len(truth)).as_dict(),
        "sensitivity": proportion(counts.tp, positives).as_dict(),
        "specificity": proportion(counts.tn, negatives).as_dict(),
        "auroc": bootstrapped(auroc(truth, values), lambda idx: auroc(truth[idx], values[idx])).as_dict(),
        "kappa": bootstrapped(
            cohen_kappa(truth, predicted), lambda idx: cohen_kappa(truth[idx], predicted[idx])
        ).as_dict(),
    }


def level_metrics(
    labels: np.ndarray, scores: np.ndarray, patients: list[str], thresholds: Any, n_resamples: int, seed: int
) -> dict[str, Any]:
    """binary_report at the decision threshold plus sensitivity/specificity at each operating point the bundle has."""
    level = binary_report(labels, scores, thresholds.decision, patients, n_resamples=n_resamples, seed=seed)
    level["operating_points"] = {}
    for name in ("high_sensitivity", "high_specificity"):
        threshold = getattr(thresholds, name)
        if threshold is None:
            continue
        confusion = binary_confusion(labels, (scores >= threshold).astype(np.int64))
        level["operating_points"][name] = {
            "threshold": threshold,
            "sensitivity": proportion(confusion.tp, confusion.tp + confusion.fn).as_dict(),
            "specificity": proportion(confusion.tn, confusion.tn + confusion.fp).as_dict(),
        }
    return level
