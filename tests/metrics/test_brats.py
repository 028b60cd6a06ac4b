"""BraTS scores: region Dice and HD95 against MONAI's implementation, lesion-wise scores by known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage

from pipelines.metrics.brats import MAX_DISTANCE_MM, brats_scores, dice, hd95, lesion_wise


def _cubes(shape, *corners, size=5):
    mask = np.zeros(shape, bool)
    for corner in corners:
        mask[tuple(slice(c, c + size) for c in corner)] = True
    return mask


def _blob(seed: int, shape=(33, 34, 35)) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(size=shape)
    return ndimage.gaussian_filter(noise, 3) > 0.05


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    return torch.stack([~mask, mask])[None].float()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 0.8, 4.0)])
def test_region_dice_and_hd95_equal_monai(seed, spacing):
    pred, ref = _blob(seed), _blob(seed + 10)
    theirs = compute_hausdorff_distance(_one_hot(pred), _one_hot(ref), percentile=95, spacing=list(spacing))
    assert hd95(pred, ref, spacing) == pytest.approx(float(theirs), rel=1e-5)
    assert dice(pred, ref) == pytest.approx(float(compute_dice(_one_hot(pred), _one_hot(ref), include_background=False)), rel=1e-6)


def test_hd95_known_answers():
    shape = (12, 12, 12)
    one, other = np.zeros(shape, bool), np.zeros(shape, bool)
    one[5, 5, 5], other[5, 5, 8] = True, True
    assert hd95(one, other, (1.0, 1.0, 2.5)) == pytest.approx(7.5)  # 3 slices of 2.5 mm
    # one stray voxel among a cube's 98 border voxels is beyond the 95th percentile
    cube = _cubes((30, 30, 30), (2, 2, 2))
    stray = cube.copy()
    stray[25, 25, 25] = True
    assert hd95(stray, cube) == 0.0 and hd95(cube, cube) == 0.0
    empty = np.zeros(shape, bool)
    assert hd95(empty, empty) == 0.0 and hd95(one, empty) == MAX_DISTANCE_MM and dice(empty, empty) == 1.0
    assert dice(_cubes(shape, (0, 0, 0), size=4), _cubes(shape, (2, 0, 0), size=4)) == pytest.approx(0.5)


def test_a_missed_lesion_and_a_false_positive_score_zero_and_the_maximum():
    shape = (60, 40, 40)
    ref = _cubes(shape, (5, 5, 5), (40, 5, 5))
    pred = _cubes(shape, (5, 5, 5), (5, 30, 30))  # the first lesion exactly, a false one far from both
    lesion_dice, lesion_hd, lesions, detected, false_positives = lesion_wise(pred, ref)
    assert (lesions, detected, false_positives) == (2, 1, 1)
    assert lesion_dice == pytest.approx(1 / 3)
    assert lesion_hd == pytest.approx(2 * MAX_DISTANCE_MM / 3)


@pytest.mark.parametrize("gap, lesions, expected_dice", [(2, 1, 2 * 125 / 375), (10, 2, 0.5)])
def test_parts_within_the_dilation_are_one_lesion(gap, lesions, expected_dice):
    shape = (50, 20, 20)
    ref = _cubes(shape, (5, 5, 5), (10 + gap, 5, 5))
    pred = _cubes(shape, (5, 5, 5))
    result = lesion_wise(pred, ref, dilation=3)
    assert result[2:] == (lesions, 1, 0)
    assert result[0] == pytest.approx(expected_dice)


def test_a_prediction_beside_a_lesion_within_the_dilation_is_not_a_false_positive():
    shape = (40, 20, 20)
    ref, pred = _cubes(shape, (5, 5, 5)), _cubes(shape, (12, 5, 5))  # 2 empty voxels between them
    lesion_dice, lesion_hd, lesions, detected, false_positives = lesion_wise(pred, ref, dilation=3)
    assert (lesions, detected, false_positives) == (1, 1, 0) and lesion_dice == 0.0
    assert lesion_hd == pytest.approx(hd95(pred, ref)) and 0 < lesion_hd < 10
    assert lesion_wise(pred, ref, dilation=1)[2:] == (1, 0, 1)  # out of reach with a smaller dilation
    # the challenge dilates with the 18-connected structure: 3 steps reach (3, 3, 0) but not (3, 3, 3)
    assert lesion_wise(_cubes(shape, (12, 12, 5)), ref)[2:] == (1, 1, 0)
    assert lesion_wise(_cubes(shape, (12, 12, 12), size=3), ref)[2:] == (1, 0, 1)


def test_small_lesions_are_left_out_by_volume_in_mm3():
    shape = (40, 20, 20)
    ref = _cubes(shape, (5, 5, 5)) | _cubes(shape, (25, 5, 5), size=3)  # 125 and 27 voxels
    pred = _cubes(shape, (5, 5, 5))
    assert lesion_wise(pred, ref) == (1.0, 0.0, 1, 1, 0)  # 27 mm^3 <= 50: not counted
    lesion_dice, lesion_hd, lesions, detected, _ = lesion_wise(pred, ref, spacing=2.0)  # 216 mm^3 counts
    assert (lesions, detected, lesion_dice) == (2, 1, 0.5) and lesion_hd == pytest.approx(MAX_DISTANCE_MM / 2)
    exactly_50 = np.zeros(shape, bool)
    exactly_50[25:30, 5:10, 5:7] = True  # 50 mm^3: left out, as the challenge's "<= threshold"
    assert lesion_wise(pred, ref & ~_cubes(shape, (25, 5, 5), size=3) | exactly_50)[2] == 1
    # a prediction of a small lesion is neither scored nor a false positive
    assert lesion_wise(ref, ref) == (1.0, 0.0, 1, 1, 0)


def test_empty_masks():
    empty, some = np.zeros((20, 20, 20), bool), _cubes((20, 20, 20), (5, 5, 5))
    assert lesion_wise(empty, empty) == (1.0, 0.0, 0, 0, 0)
    assert lesion_wise(some, empty) == (0.0, MAX_DISTANCE_MM, 0, 0, 1)
    assert lesion_wise(empty, some) == (0.0, MAX_DISTANCE_MM, 1, 0, 0)


def _tumor(shape=(40, 40, 40)) -> np.ndarray:
    """Edema around an enhancing rim around a necrotic core, BraTS 2023 labels."""
    grid = np.indices(shape) - np.asarray(shape)[:, None, None, None] // 2
    radius = np.sqrt((grid**2).sum(0))
    labels = np.zeros(shape, np.uint8)
    labels[radius < 14] = 2
    labels[radius < 8] = 3
    labels[radius < 5] = 1
    return labels


def test_brats_regions_of_a_label_map():
    ref = _tumor()
    scores = brats_scores(ref, ref, spacing=(1.0, 1.0, 1.0))
    assert set(scores) == {"WT", "TC", "ET"}
    for region in scores.values():
        assert (region.dice, region.hd95, region.lesion_dice, region.lesion_hd95) == (1.0, 0.0, 1.0, 0.0)
        assert (region.lesions, region.detected, region.false_positives) == (1, 1, 0)
    no_enhancing = np.where(ref == 3, 1, ref)  # the rim predicted as necrosis: the core is right, ET is missed
    scores = brats_scores(no_enhancing, ref)
    assert scores["WT"].dice == 1.0 and scores["TC"].dice == 1.0
    assert scores["ET"].as_dict() == {"dice": 0.0, "hd95": MAX_DISTANCE_MM, "lesion_dice": 0.0,
                                      "lesion_hd95": MAX_DISTANCE_MM, "lesions": 1, "detected": 0,
                                      "false_positives": 0}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        brats_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(np.ones((4, 4, 4)), np.ones((4, 4, 4)), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="dilation"):
        lesion_wise(np.ones((4, 4, 4)), np.ones((4, 4, 4)), dilation=-1)


def test_the_ignite_metric_scores_region_channels_as_brats_scores_does():
    """BratsRegionMetric, fed as IgniteMetricHandler feeds it (lists of decollated MetaTensors), gives
    brats_scores' values per region channel, in mm from the reference's affine, averaged over images."""
    from monai.data import MetaTensor
    from monai.handlers import IgniteMetricHandler

    from pipelines.metrics import BratsRegionMetric
    from pipelines.transforms import LabelsToRegions

    to_regions = LabelsToRegions([[1, 2, 3], [1, 3], [3]])
    spacing = (2.0, 1.5, 3.0)
    affine = torch.diag(torch.tensor([*spacing, 1.0]))
    ref = _tumor()
    shifted = np.roll(ref, 2, axis=0)
    shifted[_cubes(ref.shape, (2, 2, 2), size=4)] = 3  # a false positive enhancing lesion
    pairs = [(shifted, ref), (ref, ref)]
    preds = [MetaTensor(to_regions(torch.from_numpy(p)[None]), affine=affine) for p, _ in pairs]
    refs = [MetaTensor(to_regions(torch.from_numpy(r)[None]), affine=affine) for _, r in pairs]
    expected = [brats_scores(p, r, spacing, dilation=1, min_lesion_mm3=10) for p, r in pairs]
    for channel, region in enumerate(("WT", "TC", "ET")):
        for score in BratsRegionMetric.SCORES:
            metric = BratsRegionMetric(channel, score, dilation=1, min_lesion_mm3=10)
            metric(preds, refs)
            want = np.mean([getattr(e[region], score) for e in expected])
            assert metric.aggregate().item() == pytest.approx(want, rel=1e-5), (region, score)
    assert expected[0]["ET"].false_positives == 1  # the case the lesion-wise scores charge
    # a batch tensor without metadata: 1 mm voxels
    batch = BratsRegionMetric(0, "hd95")
    batch(torch.stack([p.as_tensor() for p in preds]), torch.stack([r.as_tensor() for r in refs]))
    assert batch.aggregate().item() == pytest.approx(np.mean([hd95(p > 0, r > 0) for p, r in pairs]), rel=1e-5)
    assert isinstance(IgniteMetricHandler(metric_fn=BratsRegionMetric(0)), IgniteMetricHandler)
    with pytest.raises(ValueError, match="`score` must be one of"):
        BratsRegionMetric(0, "jaccard")
    with pytest.raises(ValueError, match=r"expects region maps \(B, R, \*spatial\)"):
        BratsRegionMetric(3)(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4))
