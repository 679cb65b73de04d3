"""The pointing game and energy fraction on synthetic heatmaps whose answers are known in advance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.fracatlas import Box
from training.localisation import (
    box_area_fraction,
    centre_heatmap,
    energy_fraction,
    localise,
    peak_point,
    pointing_hit,
    summarise,
)


def one_hot(rows: int, columns: int, cell: tuple[int, int]) -> np.ndarray:
    grid = np.zeros((rows, columns))
    grid[cell] = 1.0
    return grid


def box_around(x: float, y: float, half: float = 3.0) -> Box:
    return Box(x - half, y - half, x + half, y + half)


def test_a_peak_inside_a_box_hits_and_outside_misses() -> None:
    heatmap = one_hot(7, 7, (2, 5))  # row 2, column 5 of a 700 x 700 image: centre (550, 250)
    assert peak_point(heatmap, 700, 700) == pytest.approx((550.0, 250.0))
    assert pointing_hit(heatmap, [Box(500, 200, 600, 300)], 700, 700)
    assert not pointing_hit(heatmap, [Box(0, 0, 100, 100)], 700, 700)
    # any of several boxes is enough
    assert pointing_hit(heatmap, [Box(0, 0, 100, 100), Box(540, 240, 560, 260)], 700, 700)


def test_the_stretch_maps_each_axis_on_its_own() -> None:
    """A 373 x 454 (W x H) radiograph is stretched to 224 x 224: the grid covers W and H separately."""
    width, height = 373, 454
    heatmap = one_hot(7, 7, (0, 6))
    x, y = (6.5 * width / 7, 0.5 * height / 7)
    assert peak_point(heatmap, width, height) == pytest.approx((x, y))
    assert pointing_hit(heatmap, [box_around(x, y)], width, height)
    # Where a mapping through a square (or with the axes swapped) would put the peak: no hit there.
    for wrong in ((6.5 * height / 7, 0.5 * height / 7), (6.5 * height / 7, 0.5 * width / 7)):
        assert math.dist(wrong, (x, y)) > 6
        assert not pointing_hit(heatmap, [box_around(*wrong)], width, height)


def test_any_grid_shape_is_mapped_back() -> None:
    heatmap = np.array([[0.0, 0.2, 0.1], [0.3, 0.0, 0.9]])  # 2 rows x 3 columns, peak at row 1, column 2
    assert peak_point(heatmap, 300, 100) == pytest.approx((250.0, 75.0))


def test_a_flat_heatmap_points_nowhere_and_misses() -> None:
    boxes = [Box(0, 0, 700, 700)]  # the whole image: any real peak would hit
    for flat in (np.zeros((7, 7)), np.full((7, 7), 0.4)):
        assert peak_point(flat, 700, 700) is None
        assert not pointing_hit(flat, boxes, 700, 700)
    assert energy_fraction(np.zeros((7, 7)), boxes, 700, 700) is None


def test_energy_of_a_uniform_map_is_the_boxes_share_of_the_image() -> None:
    boxes = [Box(10, 20, 110, 70), Box(200.5, 100.25, 260.75, 180)]
    share = box_area_fraction(boxes, 373, 454)
    assert share == pytest.approx((100 * 50 + 60.25 * 79.75) / (373 * 454))
    assert energy_fraction(np.full((7, 7), 0.3), boxes, 373, 454) == pytest.approx(share, rel=1e-6)


def test_energy_follows_the_bilinear_stretch_the_overlay_draws() -> None:
    """[[1, 0]] stretched bilinearly over 100 px: 1 on the left quarter, a ramp to 0 at three quarters, then 0.

    Total = 25 + 25 (the ramp) = 50; the left half holds 25 + 25 * (1 + 0.5) / 2 = 43.75: 7/8 of it.
    """
    heatmap = np.array([[1.0, 0.0]])
    assert energy_fraction(heatmap, [Box(0, 0, 50, 10)], 100, 10) == pytest.approx(7 / 8, abs=2e-3)
    assert energy_fraction(heatmap, [Box(50, 0, 100, 10)], 100, 10) == pytest.approx(1 / 8, abs=2e-3)
    assert energy_fraction(heatmap, [Box(0, 0, 100, 10)], 100, 10) == pytest.approx(1.0)
    assert energy_fraction(heatmap, [Box(80, 0, 100, 10)], 100, 10) == pytest.approx(0.0, abs=1e-9)


def test_energy_is_the_same_on_a_large_image_shrunk_for_the_sums() -> None:
    """Large radiographs are integrated at 512 px; scaling both the image and its boxes changes nothing."""
    heatmap = np.random.default_rng(1).random((7, 7))
    small = energy_fraction(heatmap, [Box(46, 57, 184, 230)], 460, 576)
    large = energy_fraction(heatmap, [Box(230, 285, 920, 1150)], 2300, 2880)
    assert small is not None
    assert large == pytest.approx(small, abs=0.01)


def test_union_area_counts_overlaps_once_and_clips_to_the_image() -> None:
    assert box_area_fraction([Box(0, 0, 10, 10), Box(5, 5, 15, 15)], 100, 100) == pytest.approx(175 / 10_000)
    assert box_area_fraction([Box(-10, -10, 10, 10)], 100, 100) == pytest.approx(100 / 10_000)
    assert box_area_fraction([Box(200, 200, 300, 300)], 100, 100) == 0.0


def test_the_centre_baseline_peaks_at_the_centre() -> None:
    grid = centre_heatmap((7, 7))
    assert np.unravel_index(np.argmax(grid), grid.shape) == (3, 3)
    assert peak_point(grid, 373, 454) == pytest.approx((373 / 2, 454 / 2))
    centred = localise(one_hot(7, 7, (0, 0)), [box_around(373 / 2, 454 / 2, 20)], 373, 454)
    assert centred.centre_hit
    assert not centred.hit
    # the centre baseline holds more energy in a central box than in a corner box of the same size
    corner = localise(one_hot(7, 7, (0, 0)), [Box(0, 0, 40, 40)], 373, 454)
    assert centred.centre_energy_fraction > corner.centre_energy_fraction
    assert corner.hit


def test_summary_counts_hits_and_averages_energy() -> None:
    boxes = [Box(500, 200, 600, 300)]
    cases = [
        localise(one_hot(7, 7, (2, 5)), boxes, 700, 700),  # hit
        localise(one_hot(7, 7, (0, 0)), boxes, 700, 700),  # miss
        localise(np.zeros((7, 7)), boxes, 700, 700),  # flat: miss, no energy
    ]
    summary = summarise(cases, n_resamples=200)
    assert summary["images"] == 3
    assert summary["pointing_game"]["numerator"] == 1
    assert summary["pointing_game"]["denominator"] == 3
    assert summary["pointing_game"]["method"] == "wilson"
    assert summary["flat_heatmaps"] == 1
    energies = [c.energy_fraction for c in cases[:2] if c.energy_fraction is not None]
    assert len(energies) == 2
    assert summary["energy_fraction"]["value"] == pytest.approx(np.mean(energies))
    assert summary["energy_fraction"]["images"] == 2
    assert summary["random_pointer_expected_hit_rate"] == pytest.approx(100 * 100 / 700**2)
    assert summary["centre_baseline_pointing_game"]["numerator"] == 0  # the centre (350, 350) is not in the box


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one box"):
        localise(np.ones((7, 7)), [], 10, 10)
    with pytest.raises(ValueError, match="positive"):
        localise(np.ones((7, 7)), [Box(0, 0, 1, 1)], 0, 10)
    with pytest.raises(ValueError, match="2-D"):
        peak_point(np.ones(7), 10, 10)
    with pytest.raises(ValueError, match="finite"):
        peak_point(np.full((7, 7), np.nan), 10, 10)
