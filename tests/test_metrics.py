"""training.metrics against scikit-learn and scipy, on hand-checked examples and Hypothesis inputs with ties.

The module itself is numpy-only; these references only run in the tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import metrics

skm = pytest.importorskip("sklearn.metrics")
scipy_stats = pytest.importorskip("scipy.stats")

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=150, deadline=None)

# Scores from a coarse grid, so ties between and within classes are common.
labelled_scores = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 10)), min_size=1, max_size=60).map(
    lambda pairs: (np.array([p[0] for p in pairs]), np.array([p[1] / 10 for p in pairs]))
)
both_classes = labelled_scores.filter(lambda data: 0 < data[0].sum() < len(data[0]))
T = TypeVar("T")


def defined(value: T | None) -> T:
    """Narrows a result that must exist here (and fails the test if it does not)."""
    assert value is not None
    return value


targets = st.one_of(st.sampled_from([0.5, 0.7, 0.8, 0.9, 0.95, 1.0]), st.floats(0.01, 1.0))


def test_module_is_numpy_only() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        import training.metrics
        print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "numpy" in loaded
    assert loaded.isdisjoint({"tensorflow", "keras", "sklearn", "scipy"})


# ------------------------------------------------------------------------------------------------------- Wilson


@FAST
@given(
    data=st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
    confidence=st.sampled_from([0.8, 0.9, 0.95, 0.99]),
)
def test_wilson_matches_scipy(data: tuple[int, int], confidence: float) -> None:
    k, n = data
    expected = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    low, high = defined(metrics.wilson_interval(k, n, confidence))
    assert low == pytest.approx(expected.low, abs=1e-12)
    assert high == pytest.approx(expected.high, abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_hand_example() -> None:
    # 5/10 at 95%: z = 1.959964, center = 0.5; half = z/(2(n+z^2)) * sqrt(4*10*0.25 + z^2) = 0.2663..., so the
    # interval is 0.5 -+ 0.2663 = (0.2366, 0.7634), the textbook Wilson value.
    low, high = defined(metrics.wilson_interval(5, 10))
    assert low == pytest.approx(0.2366, abs=1e-4)
    assert high == pytest.approx(0.7634, abs=1e-4)


def test_wilson_edges() -> None:
    assert metrics.wilson_interval(0, 0) is None
    assert defined(metrics.wilson_interval(0, 7))[0] == 0.0
    assert defined(metrics.wilson_interval(7, 7))[1] == 1.0
    with pytest.raises(ValueError, match="successes"):
        metrics.wilson_interval(8, 7)
    with pytest.raises(ValueError, match="confidence"):
        metrics.wilson_interval(1, 2, confidence=1.0)


def test_proportion_estimate() -> None:
    estimate = metrics.proportion(3, 4)
    assert estimate.value == 0.75
    assert (estimate.low, estimate.high) == metrics.wilson_interval(3, 4)
    assert (estimate.method, estimate.numerator, estimate.denominator) == ("wilson", 3, 4)
    empty = metrics.proportion(0, 0)
    assert (empty.value, empty.low, empty.high, empty.method) == (None, None, None, "none")
    assert json.loads(json.dumps(estimate.as_dict())) == estimate.as_dict()


# ---------------------------------------------------------------------------------------------- confusion/kappa


def test_binary_confusion_hand_example() -> None:
    y_true = [1, 1, 1, 0, 0, 0, 0]
    y_pred = [1, 1, 0, 1, 0, 0, 0]
    counts = metrics.binary_confusion(y_true, y_pred)
    assert (counts.tp, counts.fn, counts.fp, counts.tn) == (2, 1, 1, 3)
    assert counts.sensitivity == pytest.approx(2 / 3)
    assert counts.specificity == pytest.approx(3 / 4)
    assert counts.accuracy == pytest.approx(5 / 7)
    assert counts.ppv == pytest.approx(2 / 3)
    assert counts.npv == pytest.approx(3 / 4)
    # sklearn with labels=[1, 0] puts fractured first, as as_matrix does.
    assert counts.as_matrix() == skm.confusion_matrix(y_true, y_pred, labels=[1, 0]).tolist()


def test_binary_confusion_undefined_rates() -> None:
    counts = metrics.binary_confusion([0, 0], [0, 1])
    assert counts.sensitivity is None
    assert counts.ppv == 0.0
    empty = metrics.binary_confusion([], [])
    assert empty.accuracy is None
    assert empty.specificity is None
    assert empty.npv is None


def test_binary_confusion_rejects_non_binary() -> None:
    with pytest.raises(ValueError, match="only 0 and 1"):
        metrics.binary_confusion([0, 2], [0, 1])
    with pytest.raises(ValueError, match="length"):
        metrics.binary_confusion([0, 1], [0])


@FAST
@given(labels=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=60))
def test_binary_confusion_matches_sklearn(labels: list[tuple[int, int]]) -> None:
    y_true = np.array([t for t, _ in labels])
    y_pred = np.array([p for _, p in labels])
    counts = metrics.binary_confusion(y_true, y_pred)
    assert counts.as_matrix() == skm.confusion_matrix(y_true, y_pred, labels=[1, 0]).tolist()
    if counts.sensitivity is not None:
        assert counts.sensitivity == pytest.approx(skm.recall_score(y_true, y_pred, pos_label=1))
    if counts.specificity is not None:
        assert counts.specificity == pytest.approx(skm.recall_score(y_true, y_pred, pos_label=0))
    assert counts.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred))


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
@FAST
@given(
    labels=st.integers(1, 5).flatmap(
        lambda k: st.tuples(
            st.just(k), st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=0, max_size=60)
        )
    )
)
def test_confusion_matrix_matches_sklearn(labels: tuple[int, list[tuple[int, int]]]) -> None:
    n_classes, pairs = labels
    y_true = np.array([t for t, _ in pairs], dtype=np.int64)
    y_pred = np.array([p for _, p in pairs], dtype=np.int64)
    matrix = metrics.confusion_matrix(y_true, y_pred, n_classes)
    assert matrix.dtype == np.int64
    assert matrix.shape == (n_classes, n_classes)
    if pairs:
        expected = skm.confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))
        np.testing.assert_array_equal(matrix, expected)
    else:
        assert matrix.sum() == 0


def test_confusion_matrix_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="y_pred"):
        metrics.confusion_matrix([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="y_true"):
        metrics.confusion_matrix([-1, 1], [0, 1], 3)


@FAST
@given(pairs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=60))
def test_cohen_kappa_matches_sklearn(pairs: list[tuple[int, int]]) -> None:
    y_true = np.array([t for t, _ in pairs])
    y_pred = np.array([p for _, p in pairs])
    kappa = metrics.cohen_kappa(y_true, y_pred)
    if len(set(y_true.tolist()) | set(y_pred.tolist())) == 1:
        assert kappa is None  # sklearn returns nan (with a warning) here
    else:
        assert kappa == pytest.approx(skm.cohen_kappa_score(y_true, y_pred), abs=1e-12)


def test_cohen_kappa_hand_example() -> None:
    # 2x2 [[2, 1], [1, 3]] (n = 7): p_o = 5/7; p_e = (3*3 + 4*4)/49 = 25/49; kappa = (35 - 25)/(49 - 25) = 10/24.
    assert metrics.cohen_kappa([1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0]) == pytest.approx(10 / 24)
    assert metrics.cohen_kappa([3, 3, 3], [3, 3, 3]) is None
    assert metrics.cohen_kappa([], []) is None
    assert metrics.cohen_kappa([0, 1], [1, 0]) == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------------------------- AUROC


@FAST
@given(data=both_classes)
def test_auroc_matches_sklearn(data: tuple[np.ndarray, np.ndarray]) -> None:
    y_true, scores = data
    assert metrics.auroc(y_true, scores) == pytest.approx(skm.roc_auc_score(y_true, scores), abs=1e-12)


def test_auroc_hand_example_with_ties() -> None:
    # Positives 0.9, 0.5; negatives 0.5, 0.1.  Pairs: (0.9>0.5) 1, (0.9>0.1) 1, (0.5=0.5) 1/2, (0.5>0.1) 1 -> 3.5/4.
    assert metrics.auroc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(0.875)


def test_auroc_undefined_with_one_class() -> None:
    assert metrics.auroc([1, 1, 1], [0.2, 0.5, 0.9]) is None
    assert metrics.auroc([0, 0], [0.2, 0.5]) is None
    assert metrics.auroc([], []) is None
    with pytest.raises(ValueError, match="finite"):
        metrics.auroc([0, 1], [0.2, float("nan")])


# ---------------------------------------------------------------------------------------------- operating points


def _sklearn_high_sensitivity(y_true: np.ndarray, scores: np.ndarray, target: float) -> float:
    fpr, tpr, thresholds = skm.roc_curve(y_true, scores, drop_intermediate=False)
    ok = np.isfinite(thresholds) & (tpr >= target - 1e-9)
    return float(thresholds[ok].max())


def _sklearn_high_specificity(y_true: np.ndarray, scores: np.ndarray, target: float) -> float:
    fpr, tpr, thresholds = skm.roc_curve(y_true, scores, drop_intermediate=False)
    ok = np.isfinite(thresholds) & (1 - fpr >= target - 1e-9)
    return float(thresholds[ok].min()) if ok.any() else float(np.nextafter(scores.max(), np.inf))


@FAST
@given(data=both_classes, target=targets)
def test_high_sensitivity_threshold_matches_roc_curve(data: tuple[np.ndarray, np.ndarray], target: float) -> None:
    y_true, scores = data
    threshold = defined(metrics.high_sensitivity_threshold(y_true, scores, target))
    assert threshold == _sklearn_high_sensitivity(y_true, scores, target)
    achieved = defined(metrics.binary_confusion(y_true, scores >= threshold).sensitivity)
    assert achieved >= target - 1e-9


@FAST
@given(data=both_classes, target=targets)
def test_high_specificity_threshold_matches_roc_curve(data: tuple[np.ndarray, np.ndarray], target: float) -> None:
    y_true, scores = data
    threshold = defined(metrics.high_specificity_threshold(y_true, scores, target))
    assert threshold == _sklearn_high_specificity(y_true, scores, target)
    achieved = defined(metrics.binary_confusion(y_true, scores >= threshold).specificity)
    assert achieved >= target - 1e-9


def test_thresholds_hand_example() -> None:
    # Positives 0.9, 0.8, 0.6, 0.4, 0.3 (5); negatives 0.7, 0.5, 0.3, 0.2, 0.1 (5).
    y_true = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.6, 0.4, 0.3, 0.7, 0.5, 0.3, 0.2, 0.1])
    # Sensitivity >= 0.8 needs 4 positives: the 4th highest positive is 0.4 (t = 0.5 keeps only 3).
    assert metrics.high_sensitivity_threshold(y_true, scores, 0.8) == 0.4
    # Sensitivity 1.0 needs the lowest positive, 0.3 (tied with a negative: it still counts as >= t).
    assert metrics.high_sensitivity_threshold(y_true, scores, 1.0) == 0.3
    # Specificity >= 0.8 needs 4 normals below t: 0.1, 0.2, 0.3, 0.5 -> lowest observed t above 0.5 is 0.6.
    assert metrics.high_specificity_threshold(y_true, scores, 0.8) == 0.6
    # Specificity >= 0.6 needs 3 normals below t: above 0.3, the lowest observed score is 0.4.
    assert metrics.high_specificity_threshold(y_true, scores, 0.6) == 0.4
    # 0.7 * 5 = 3.5 -> 4 normals, as for 0.8; guards the rounding of target * n.
    assert metrics.high_specificity_threshold(y_true, scores, 0.7) == 0.6


def test_threshold_float_fuzz() -> None:
    # 0.28 * 25 == 7.000000000000001 in floats; a naive ceil would demand 8 of 25 instead of 7 (7/25 is 0.28).
    assert 0.28 * 25 > 7
    scores = np.arange(25, 0, -1) / 100  # 0.25, 0.24, ..., 0.01
    # 7 of 25 positives at or above t: the 7th highest score, 0.19.
    assert metrics.high_sensitivity_threshold(np.ones(25, dtype=int), scores, 0.28) == 0.19
    # 7 of 25 normals below t: 0.01 .. 0.07, so t = 0.08.
    assert metrics.high_specificity_threshold(np.zeros(25, dtype=int), scores, 0.28) == 0.08


def test_high_specificity_above_every_score() -> None:
    # The top score is a normal: specificity 1 needs t above it, which no observed score offers.
    threshold = defined(metrics.high_specificity_threshold([1, 0, 1, 0], [0.2, 0.9, 0.5, 0.4], 1.0))
    assert threshold == np.nextafter(0.9, np.inf)
    assert threshold > 0.9


def test_thresholds_undefined() -> None:
    assert metrics.high_sensitivity_threshold([0, 0], [0.1, 0.9]) is None
    assert metrics.high_specificity_threshold([1, 1], [0.1, 0.9]) is None
    with pytest.raises(ValueError, match="target"):
        metrics.high_sensitivity_threshold([0, 1], [0.1, 0.9], target=1.5)


# --------------------------------------------------------------------------------------------------- bootstrap


def _mean_statistic(values: np.ndarray) -> Callable[[np.ndarray], float]:
    return lambda idx: float(values[idx].mean())


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    values = np.random.default_rng(1).normal(size=50)
    groups = [i // 2 for i in range(50)]
    first = metrics.bootstrap_interval(_mean_statistic(values), groups, n_resamples=200, seed=7)
    again = metrics.bootstrap_interval(_mean_statistic(values), groups, n_resamples=200, seed=7)
    other = metrics.bootstrap_interval(_mean_statistic(values), groups, n_resamples=200, seed=8)
    assert first == again
    assert first != other


def test_bootstrap_interval_brackets_the_estimate_with_the_right_width() -> None:
    values = np.random.default_rng(2).normal(size=400)
    low, high = defined(metrics.bootstrap_interval(_mean_statistic(values), list(range(400)), n_resamples=1000))
    assert low < values.mean() < high
    # For a mean of n iid values the 95% interval is about +-1.96 sd / sqrt(n).
    expected_width = 2 * 1.959964 * values.std() / math.sqrt(len(values))
    assert high - low == pytest.approx(expected_width, rel=0.15)


def test_bootstrap_resamples_whole_patients() -> None:
    groups = ["a", "a", "a", "b", "c", "c", "d", "e", "e", "e"]
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    seen: list[np.ndarray] = []

    def record(idx: np.ndarray) -> float:
        seen.append(idx.copy())
        return float(len(idx))

    metrics.bootstrap_interval(record, groups, n_resamples=100)
    assert len(seen) == 100
    for idx in seen:
        assert idx.dtype.kind == "i"
        counts = Counter(idx.tolist())
        drawn = 0
        for group_members in members.values():
            multiplicities = {counts[i] for i in group_members}
            assert len(multiplicities) == 1  # a patient's images always come together
            drawn += multiplicities.pop()
        assert drawn == len(members)  # as many patients as there are, with replacement
    # With replacement: some resample repeats a patient (P(all 5 distinct) = 5!/5^5 ~ 4% each).
    assert any(len(set(idx.tolist())) < len(idx) for idx in seen)


def test_bootstrap_clusters_widen_the_interval() -> None:
    # 40 patients with 10 identical images each: there are 40 independent values, not 400.
    patient_values = np.random.default_rng(3).normal(size=40)
    values = np.repeat(patient_values, 10)
    patients = np.repeat(np.arange(40), 10).tolist()
    low, high = defined(metrics.bootstrap_interval(_mean_statistic(values), patients, n_resamples=500))
    naive_low, naive_high = defined(
        metrics.bootstrap_interval(_mean_statistic(values), list(range(400)), n_resamples=500)
    )
    # Image-level resampling understates the spread by about sqrt(10).
    assert (high - low) / (naive_high - naive_low) == pytest.approx(math.sqrt(10), rel=0.25)


def test_bootstrap_skips_undefined_resamples() -> None:
    # 10 singleton patients; the statistic is undefined when patient 0 is drawn twice or more:
    # P = 1 - 0.9^10 - 10 * 0.1 * 0.9^9 ~ 0.26, so most resamples still give a value (always 0 or 1).
    def statistic(idx: np.ndarray) -> float | None:
        zeros = int(np.count_nonzero(idx == 0))
        return None if zeros >= 2 else float(zeros)

    low, high = defined(metrics.bootstrap_interval(statistic, list(range(10)), n_resamples=400))
    assert (low, high) == (0.0, 1.0)


def test_bootstrap_none_when_mostly_undefined() -> None:
    assert metrics.bootstrap_interval(lambda idx: None, [0, 1, 2], n_resamples=50) is None
    # With 2 patients, patient 0 is drawn in 3/4 of resamples: too few values left.
    assert metrics.bootstrap_interval(lambda idx: None if 0 in idx else 1.0, [0, 1], n_resamples=200) is None
    assert metrics.bootstrap_interval(lambda idx: 1.0, [], n_resamples=10) is None


# ------------------------------------------------------------------------------------------------------ report


def _report_inputs() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(4)
    patients = 60
    per_patient = rng.integers(1, 4, size=patients)
    patient_label = rng.integers(0, 2, size=patients)
    y_true = np.repeat(patient_label, per_patient)
    scores = np.clip(0.3 * y_true + rng.normal(0.35, 0.2, size=len(y_true)), 0, 1).round(2)
    groups = [f"patient{p}" for p in np.repeat(np.arange(patients), per_patient)]
    return y_true, scores, groups


def test_binary_report_matches_sklearn() -> None:
    y_true, scores, groups = _report_inputs()
    report = metrics.binary_report(y_true, scores, 0.5, groups, n_resamples=300, seed=3)
    assert json.loads(json.dumps(report)) == report
    y_pred = (scores >= 0.5).astype(int)
    assert (report["n"], report["positives"], report["negatives"]) == (len(y_true), y_true.sum(), (1 - y_true).sum())
    assert report["patients"] == 60
    assert report["threshold"] == 0.5
    confusion = report["confusion"]
    assert confusion["labels"] == ["fractured", "normal"]
    assert confusion["matrix"] == skm.confusion_matrix(y_true, y_pred, labels=[1, 0]).tolist()
    assert confusion["matrix"] == [[confusion["tp"], confusion["fn"]], [confusion["fp"], confusion["tn"]]]
    assert report["sensitivity"]["value"] == pytest.approx(skm.recall_score(y_true, y_pred, pos_label=1))
    assert report["specificity"]["value"] == pytest.approx(skm.recall_score(y_true, y_pred, pos_label=0))
    assert report["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert report["sensitivity"]["method"] == "wilson"
    assert report["sensitivity"]["denominator"] == report["positives"]
    assert report["auroc"]["value"] == pytest.approx(skm.roc_auc_score(y_true, scores))
    assert report["kappa"]["value"] == pytest.approx(skm.cohen_kappa_score(y_true, y_pred))
    for key in ("accuracy", "sensitivity", "specificity", "auroc", "kappa"):
        assert report[key]["low"] <= report[key]["value"] <= report[key]["high"], key
    for key in ("auroc", "kappa"):
        assert report[key]["method"] == "patient bootstrap (300 resamples)"
    # The bootstrap uses the patients: a different grouping changes the interval.
    per_image = metrics.binary_report(y_true, scores, 0.5, list(range(len(y_true))), n_resamples=300, seed=3)
    assert per_image["auroc"]["value"] == report["auroc"]["value"]
    assert (per_image["auroc"]["low"], per_image["auroc"]["high"]) != (report["auroc"]["low"], report["auroc"]["high"])


def test_binary_report_one_class() -> None:
    report = metrics.binary_report([1, 1, 1], [0.2, 0.6, 0.9], 0.5, ["a", "b", "c"], n_resamples=50)
    assert report["negatives"] == 0
    assert report["specificity"]["value"] is None
    assert report["specificity"]["method"] == "none"
    assert report["auroc"] == {
        "value": None,
        "low": None,
        "high": None,
        "method": "none",
        "numerator": None,
        "denominator": None,
    }
    assert report["sensitivity"]["value"] == pytest.approx(2 / 3)
    json.dumps(report)


def test_binary_report_rejects_mismatched_groups() -> None:
    with pytest.raises(ValueError, match="groups"):
        metrics.binary_report([0, 1], [0.1, 0.9], 0.5, ["a"])
