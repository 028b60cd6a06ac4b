"""RANO measurements against shapes whose diameters are known, and the response categories on
constructed series of studies (each threshold from both sides)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.metrics.rano import TARGETS, assess, assess_volume, axial_axis, measure_lesions, target_sum


def _grid(shape, spacing, angle_deg=0.0):
    """An affine with ``spacing`` (mm) whose in-plane axes are turned by ``angle_deg`` about S."""
    t = np.radians(angle_deg)
    rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = -np.asarray(spacing) * np.asarray(shape) / 2
    return affine


def _ellipsoid(shape, affine, centre_mm, radii_mm, angle_deg, core_radii_mm=None):
    """Voxels inside an ellipsoid (radii along its own axes, turned by ``angle_deg`` about S in
    patient space), minus an inner one when ``core_radii_mm`` (a ring)."""
    index = np.indices(shape).reshape(3, -1).T
    points = index @ affine[:3, :3].T + affine[:3, 3] - np.asarray(centre_mm)
    t = np.radians(angle_deg)
    local = points @ np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    inside = ((local / radii_mm) ** 2).sum(1) <= 1
    if core_radii_mm is not None:
        inside &= ((local / core_radii_mm) ** 2).sum(1) > 1
    return inside.reshape(shape)


@pytest.mark.parametrize(("spacing", "grid_angle", "shape_angle"), [
    ((1.0, 1.0, 1.0), 0, 30), ((0.7, 0.9, 4.0), 0, 65), ((0.9, 0.9, 3.0), 20, -40), ((1.2, 0.8, 5.0), -35, 10),
])
def test_an_ellipsoid_measures_its_two_axes_within_a_voxel(spacing, grid_angle, shape_angle):
    shape = (96, 96, 24)
    affine = _grid(shape, spacing, grid_angle)
    mask = _ellipsoid(shape, affine, (3.0, -2.0, 1.0), (21.0, 12.5, 20.0), shape_angle)
    (lesion,) = measure_lesions(mask, affine)
    voxel = max(spacing[:2])
    assert lesion.axis == 2 and lesion.measurable and lesion.why == ""
    assert abs(lesion.longest_mm - 42.0) <= voxel, lesion.longest_mm
    assert abs(lesion.perpendicular_mm - 25.0) <= voxel, lesion.perpendicular_mm
    # measured through the ellipsoid's middle, on one of the slices nearest its centre
    centre_slice = np.linalg.solve(affine[:3, :3], np.array([3.0, -2.0, 1.0]) - affine[:3, 3])[2]
    assert abs(lesion.slice_index - centre_slice) <= 1.5
    # the drawn diameters have the lengths stated
    for (start, end), length in zip(lesion.ends, (lesion.longest_mm, lesion.perpendicular_mm)):
        assert np.linalg.norm(affine[:3, :2] @ (end - start)) == pytest.approx(length, abs=1e-6)


def test_small_and_thin_lesions_are_not_measurable_and_say_why():
    shape, spacing = (80, 80, 20), (1.0, 1.0, 3.0)
    affine = _grid(shape, spacing)
    small = _ellipsoid(shape, affine, (-20.0, 0.0, 0.0), (6.0, 4.5, 9.0), 0)  # 12 x 9 mm: one diameter under 10 mm
    flat = np.zeros(shape, bool)
    flat[40:60, 10:30, 12] = True  # 20 x 20 mm on one slice only
    lesions = {lesion.slices: lesion for lesion in measure_lesions(small | flat, affine)}
    assert not lesions[1].measurable and "seen on 1 axial slice" in lesions[1].why
    small_lesion = next(lesion for lesion in lesions.values() if lesion.slices > 1)
    assert not small_lesion.measurable and "under 10 mm" in small_lesion.why
    assert target_sum(list(lesions.values())) == ([], 0.0)


def test_a_ring_enhancing_lesion_is_measured_across_its_necrotic_core():
    shape, spacing = (90, 90, 30), (0.9, 0.9, 2.0)
    affine = _grid(shape, spacing)
    ring = _ellipsoid(shape, affine, (0.0, 0.0, 0.0), (18.0, 14.0, 15.0), 45, core_radii_mm=(13.0, 9.0, 10.0))
    (lesion,) = measure_lesions(ring, affine)
    assert abs(lesion.longest_mm - 36.0) <= 0.9 and abs(lesion.perpendicular_mm - 28.0) <= 0.9


def test_the_axial_axis_is_found_on_a_sagittal_grid():
    sagittal = np.array([[0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])  # i: A, j: -S... k: R
    assert axial_axis(sagittal) == 1
    assert axial_axis(_grid((10, 10, 10), (1, 1, 1), 30)) == 2


def test_at_most_three_targets_the_largest_products():
    shape, spacing = (160, 160, 16), (1.0, 1.0, 3.0)
    affine = _grid(shape, spacing)
    centres = [(-50, -50, 0), (-50, 40, 0), (40, -50, 0), (40, 40, 0)]
    sizes = [(8, 7), (15, 12), (11, 10), (20, 18)]
    mask = np.zeros(shape, bool)
    for centre, (a, b) in zip(centres, sizes):
        mask |= _ellipsoid(shape, affine, centre, (a, b, 12.0), 0)
    lesions = measure_lesions(mask, affine)
    targets, total = target_sum(lesions)
    assert len(targets) == TARGETS == 3
    by_number = {lesion.lesion: lesion for lesion in lesions}
    assert total == pytest.approx(sum(by_number[n].product_mm2 for n in targets))
    assert min(by_number[n].product_mm2 for n in targets) > max(
        lesion.product_mm2 for lesion in lesions if lesion.lesion not in targets)


@pytest.mark.parametrize(("now", "earlier", "new", "category", "rule"), [
    (1000.0, [1000.0], 0, "SD", "neither"),
    (1249.0, [1000.0], 0, "SD", "neither"),  # 24.9 % over the nadir
    (1250.0, [1000.0], 0, "PD", "25.0 % over the nadir"),
    (501.0, [1000.0], 0, "SD", "neither"),  # 49.9 % under the baseline
    (500.0, [1000.0], 0, "PR", "50.0 % under the baseline"),
    (600.0, [1000.0, 400.0], 0, "PD", "50.0 % over the nadir"),  # 40 % under the baseline, yet over the nadir
    (500.0, [1000.0, 400.0], 0, "PD", "25.0 % over the nadir (400.0 mm2)"),  # the nadir, not the baseline
    (499.0, [1000.0, 400.0], 0, "PR", "50.1 % under the baseline"),
    (0.0, [1000.0], 0, "CR", "no measurable enhancing disease left"),
    (300.0, [1000.0, 0.0], 0, "PD", "after the sum of products had reached 0"),
    (900.0, [1000.0], 1, "PD", "1 new measurable"),
    (1300.0, [1000.0], 2, "PD", "2 new measurable enhancing lesion(s); sum of products 30.0 % over the nadir"),
    (0.0, [0.0], 0, "SD", "no measurable enhancing disease at baseline or now"),
])
def test_the_category_follows_the_thresholds(now, earlier, new, category, rule):
    assessment = assess(now, earlier, new)
    assert assessment.category == category and rule in assessment.rule
    record = assessment.as_record()
    assert record["nadir_sum_mm2"] == min(earlier) and record["baseline_sum_mm2"] == earlier[0]
    assert "not confirmed" in record["note"]


def test_no_earlier_study_is_refused():
    with pytest.raises(ValueError, match="earlier studies"):
        assess(10.0, [])
    with pytest.raises(ValueError, match="earlier studies"):
        assess_volume(10.0, [])


@pytest.mark.parametrize(("now", "earlier", "category", "rule"), [
    (10.0, [10.0], "SD", "neither"),
    (13.99, [10.0], "SD", "neither"),  # 39.9 % over the smallest
    (14.0, [10.0], "PD", "40.0 % over the smallest earlier volume (10.00 mL)"),
    (3.51, [10.0], "SD", "neither"),  # 64.9 % under the baseline
    (3.5, [10.0], "PR", "65.0 % under the baseline"),
    (4.2, [10.0, 3.0], "PD", "40.0 % over the smallest earlier volume (3.00 mL)"),  # the nadir, not the baseline
    (0.0, [10.0], "CR", "no enhancing disease left"),
    (0.5, [10.0, 0.0], "PD", "after the volume had reached 0"),
    (0.0, [0.0], "SD", "neither"),
])
def test_the_volumetric_category_follows_rano_2_thresholds(now, earlier, category, rule):
    assessment = assess_volume(now, earlier)
    assert assessment.category == category and rule in assessment.rule
    record = assessment.as_record()
    assert record["nadir_ml"] == min(earlier) and record["baseline_ml"] == earlier[0] and record["now_ml"] == now


@pytest.mark.parametrize(("now", "minor", "category", "rule"), [
    (751.0, True, "SD", "neither"),  # 24.9 % under the baseline
    (750.0, True, "MR", "25.0 % under the baseline (1000.0 mm2), at least 25 % and under 50 %"),
    (501.0, True, "MR", "49.9 % under"),
    (500.0, True, "PR", "50.0 % under the baseline"),
    (750.0, False, "SD", "neither"),  # enhancing disease has no minor response
])
def test_non_enhancing_disease_has_a_minor_response(now, minor, category, rule):
    assessment = assess(now, [1000.0], minor=minor)
    assert assessment.category == category and rule in assessment.rule
