from __future__ import annotations

import numpy as np
import pytest

from pipelines.batch import dice_scores, lesion_measurements, max_diameter_mm


def test_volumes_lesions_and_diameter_of_known_shapes():
    labels = np.zeros((40, 30, 20), np.uint8)
    labels[2:12, 2:7, 2:4] = 1  # 10 x 5 x 2 voxels of tumor
    labels[12:14, 2:7, 2:4] = 2  # edema touching it: the same lesion
    labels[30:32, 20:22, 10:12] = 2  # a separate small lesion
    affine = np.diag([2.0, 1.0, 3.0, 1.0])  # 6 mm^3 voxels
    result = lesion_measurements(labels, affine, {1: "tumor", 2: "edema"})
    assert result["volumes_ml"] == {"tumor": pytest.approx(100 * 6 / 1000), "edema": pytest.approx(28 * 6 / 1000)}
    assert result["lesion_count"] == 2
    largest = result["largest_lesion"]
    assert largest["volume_ml"] == pytest.approx(120 * 6 / 1000)
    # farthest voxel centres: (2,2,2)-(13,6,3) -> (22, 4, 3) mm apart
    assert largest["diameter_mm"] == pytest.approx(np.sqrt(22**2 + 4**2 + 3**2), abs=0.01)
    assert largest["centre_voxel"] == [8, 4, 2]  # centre of mass (7.5, 4, 2.5), rounded half to even


def test_two_tumors_in_one_edema_are_two_lesions_when_lesions_are_tumors():
    labels = np.zeros((40, 20, 20), np.uint8)
    labels[2:30, 2:12, 2:12] = 2  # one edema
    labels[4:8, 4:8, 4:8] = 1  # holding two separate tumors
    labels[20:26, 4:8, 4:8] = 1
    every_label = lesion_measurements(labels, np.eye(4), {1: "tumor", 2: "edema"})
    assert every_label["lesion_count"] == 1 and every_label["largest_lesion"]["volume_ml"] == pytest.approx(2.8)
    tumors = lesion_measurements(labels, np.eye(4), {1: "tumor", 2: "edema"}, lesion_labels=[1])
    assert tumors["lesion_count"] == 2
    assert tumors["largest_lesion"]["volume_ml"] == pytest.approx(6 * 16 / 1000)
    assert tumors["largest_lesion"]["diameter_mm"] == pytest.approx(np.sqrt(5**2 + 3**2 + 3**2), abs=0.01)
    assert tumors["volumes_ml"] == every_label["volumes_ml"]
    # each tumor measured on its own, the largest first
    assert [(t["volume_ml"], t["diameter_mm"], t["centre_voxel"]) for t in tumors["lesions"]] == [
        (pytest.approx(0.096), pytest.approx(np.sqrt(5**2 + 3**2 + 3**2), abs=0.01), [22, 6, 6]),  # centre 22.5, rounded half to even
        (pytest.approx(0.064), pytest.approx(np.sqrt(3**2 + 3**2 + 3**2), abs=0.01), [6, 6, 6]),
    ]
    assert tumors["largest_lesion"] == tumors["lesions"][0]


def test_a_record_lists_the_largest_lesions_and_counts_them_all(monkeypatch):
    from pipelines.batch import measures

    monkeypatch.setattr(measures, "MAX_LESIONS_LISTED", 2)
    labels = np.zeros((30, 6, 6), np.uint8)
    for start, size in ((0, 1), (4, 3), (10, 2), (16, 4)):
        labels[start:start + size, 1:3, 1:3] = 1
    result = lesion_measurements(labels, np.eye(4), {1: "tumor"})
    assert result["lesion_count"] == 4 and [t["volume_ml"] for t in result["lesions"]] == [0.016, 0.012]


def test_diameter_of_a_ball_uses_the_convex_hull_and_physical_spacing():
    grid = np.indices((41, 41, 41)).astype(float)
    ball = ((grid - 20) ** 2).sum(0) <= 15**2
    assert max_diameter_mm(ball, np.diag([0.5, 0.5, 0.5, 1])) == pytest.approx(15.0, abs=0.05)
    assert max_diameter_mm(np.zeros((3, 3, 3), bool), np.eye(4)) == 0.0
    single = np.zeros((3, 3, 3), bool)
    single[1, 1, 1] = True
    assert max_diameter_mm(single, np.eye(4)) == 0.0


def test_no_lesion():
    result = lesion_measurements(np.zeros((5, 5, 5), np.uint8), np.eye(4), {1: "tumor"})
    assert result == {"volumes_ml": {"tumor": 0.0}, "lesion_count": 0, "lesions": [], "largest_lesion": None}


def test_dice_scores_leave_undefined_labels_out():
    prediction = np.array([0, 1, 1, 2, 0])
    reference = np.array([0, 1, 0, 2, 2])
    assert dice_scores(prediction, reference, {1: "a", 2: "b", 3: "c"}) == {"a": pytest.approx(2 / 3, abs=1e-4), "b": pytest.approx(2 / 3, abs=1e-4), "c": None}
