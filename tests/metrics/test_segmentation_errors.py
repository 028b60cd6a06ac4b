from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.measure import label as connected
from skimage.metrics import adapted_rand_error

from pipelines.metrics import (
    AdaptedRandErrorMetric,
    ClassDiceMetric,
    PixelErrorMetric,
    class_dice,
    pixel_error,
    rand_error,
)


def cells(*rows):
    return np.array([[int(c) for c in row] for row in rows])


def test_pixel_error_hand_computed():
    assert pixel_error(cells("1100", "0011"), cells("1000", "0011")) == pytest.approx(1 / 8)
    assert pixel_error(np.ones((3, 3)), np.ones((3, 3))) == 0.0


def test_rand_error_perfect_merge_and_split():
    truth = cells("11011", "11011", "11011")  # two cells split by a membrane column
    assert rand_error(truth, truth) == 0.0
    merged = cells("11111", "11111", "11111")  # membrane lost: the two cells merge
    split = cells("11011", "00000", "11011")  # extra membrane: four cells
    assert rand_error(merged, truth) > 0.1
    assert rand_error(split, truth) > 0.1


def test_rand_error_uses_four_connectivity():
    truth = cells("1100", "0000", "0011")  # two cells
    pred = cells("1100", "0010", "0001")  # linked only through corners
    four = adapted_rand_error(connected(truth, connectivity=1), connected(pred, connectivity=1))[0]
    eight = adapted_rand_error(connected(truth, connectivity=2), connected(pred, connectivity=2))[0]
    assert four != pytest.approx(eight)
    assert rand_error(pred, truth) == pytest.approx(four)
    assert rand_error(pred, truth, connectivity=2) == pytest.approx(eight)


def test_rand_error_needs_foreground():
    with pytest.raises(ValueError, match="no foreground"):
        rand_error(np.ones((3, 3)), np.zeros((3, 3)))


def test_class_dice_hand_computed():
    assert class_dice(cells("0011"), cells("0111"), class_index=0) == pytest.approx(2 * 1 / (2 + 1))
    assert class_dice(cells("11"), cells("11"), class_index=0) == 1.0


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        pixel_error(np.zeros((2, 2)), np.zeros((2, 3)))


def test_cumulative_metrics_average_over_images():
    truth = torch.tensor(cells("11011", "11011", "11011"), dtype=torch.float32)[None, None]
    pred = truth.clone()
    pred[..., 0, 2] = 1.0  # one wrong pixel out of 15
    metric = PixelErrorMetric()
    metric(y_pred=torch.cat([truth, pred]), y=torch.cat([truth, truth]))
    assert metric.aggregate().item() == pytest.approx((0 + 1 / 15) / 2)
    metric.reset()
    metric(y_pred=[t for t in pred], y=[t for t in truth])  # decollated lists as ignite handlers pass
    assert metric.aggregate().item() == pytest.approx(1 / 15)
    rand = AdaptedRandErrorMetric()
    rand(y_pred=truth, y=truth)
    assert rand.aggregate().item() == 0.0
    dice = ClassDiceMetric(class_index=0)
    dice(y_pred=pred, y=truth)
    assert dice.aggregate().item() == pytest.approx(2 * 2 / (2 + 3))


def test_metric_input_checks():
    with pytest.raises(ValueError, match=r"class-index maps \(B, 1, \*spatial\)"):
        PixelErrorMetric()(y_pred=torch.zeros(1, 2, 4, 4), y=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="no values to aggregate"):
        PixelErrorMetric().aggregate()


def test_class_dice_over_several_classes_is_their_mean():
    import torch

    from pipelines.metrics import ClassDiceMetric

    target = torch.zeros(1, 1, 4, 4, 2, dtype=torch.long)
    target[0, 0, :2] = 1
    target[0, 0, 2:, :2] = 2
    pred = target.clone()
    pred[0, 0, 2:, :2] = 0  # class 2 missed entirely, class 1 perfect
    metric = ClassDiceMetric(class_index=[1, 2])
    metric(pred, target)
    assert metric.aggregate().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one class"):
        ClassDiceMetric(class_index=[])


def test_ignore_empty_leaves_out_images_without_the_class():
    import torch

    from pipelines.metrics import ClassDiceMetric

    target = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    target[0, 0, :2] = 2
    pred = target.clone()
    pred[1, 0, 0, 0] = 2  # one false-positive voxel where the reference has no class 2
    strict, lenient = ClassDiceMetric(2), ClassDiceMetric(2, ignore_empty=True)
    strict(pred, target)
    lenient(pred, target)
    assert strict.aggregate().item() == pytest.approx(0.5)  # 1 and 0
    assert lenient.aggregate().item() == pytest.approx(1.0)  # the second image does not count
    both = ClassDiceMetric([1, 2], ignore_empty=True)
    both(pred, target)
    assert both.aggregate().item() == pytest.approx(1.0)  # class 1 is absent everywhere: left out
    none = ClassDiceMetric(1, ignore_empty=True)
    none(pred, target)
    assert torch.isnan(none.aggregate())
