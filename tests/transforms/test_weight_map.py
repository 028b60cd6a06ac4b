from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from pipelines.transforms import UNetWeightMap, UNetWeightMapd, unet_weight_map


def brute_force(label, w0=10.0, sigma=5.0, connectivity=1):
    """The paper's formula with a full distance transform per cell and sorted distances."""
    cells = label == 1
    components, n = ndimage.label(cells, ndimage.generate_binary_structure(label.ndim, connectivity))
    w_bg, w_fg = label.size / (2 * (~cells).sum()), label.size / (2 * cells.sum())
    weight = np.where(cells, w_fg, w_bg)
    if n >= 2:
        distances = np.sort(np.stack([ndimage.distance_transform_edt(components != i) for i in range(1, n + 1)]), axis=0)
        weight = weight + np.where(cells, 0.0, w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma**2)))
    return weight


def test_hand_computed_gap_between_two_cells():
    # one row: cell A at x = 0, 1; membrane at 2, 3, 4; cell B at 5, 6
    label = np.array([[1, 1, 0, 0, 0, 1, 1]])
    w = unet_weight_map(label, w0=10.0, sigma=5.0)
    w_bg, w_fg = 7 / (2 * 3), 7 / (2 * 4)
    edge = w_bg + 10 * math.exp(-((1 + 3) ** 2) / 50)  # x = 2: 1 px to A, 3 px to B
    middle = w_bg + 10 * math.exp(-((2 + 2) ** 2) / 50)  # x = 3: 2 px to each
    np.testing.assert_allclose(w[0], [w_fg, w_fg, edge, middle, edge, w_fg, w_fg], rtol=1e-6)


def test_touching_cells_get_the_highest_weight():
    label = np.ones((9, 9), dtype=int)
    label[:, 4] = 0  # a one-pixel membrane between two cells
    w = unet_weight_map(label)
    expected = 81 / (2 * 9) + 10 * math.exp(-((1 + 1) ** 2) / 50)
    assert w[4, 4] == pytest.approx(expected, rel=1e-6)
    assert w[:, 4].min() == pytest.approx(expected, rel=1e-6)


def test_single_cell_has_no_border_term():
    label = np.zeros((12, 12), dtype=int)
    label[3:8, 3:8] = 1
    w = unet_weight_map(label)
    np.testing.assert_allclose(np.unique(w), sorted([144 / (2 * 119), 144 / (2 * 25)]), rtol=1e-6)


def test_explicit_class_weights_and_no_border():
    label = np.array([[1, 0, 1]])
    np.testing.assert_allclose(unet_weight_map(label, w0=0, class_weights=(3.0, 0.5)), [[0.5, 3.0, 0.5]])


def test_empty_label_is_uniform():
    assert np.all(unet_weight_map(np.zeros((5, 5), dtype=int)) == 1.0)


def test_connectivity_decides_what_a_cell_is():
    label = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])  # diagonal neighbours
    four = unet_weight_map(label, connectivity=1)
    eight = unet_weight_map(label, connectivity=2)
    assert four[0, 1] > eight[0, 1]  # two cells under 4-connectivity: a border between them


@pytest.mark.parametrize("shape,connectivity", [((64, 80), 1), ((64, 80), 2), ((20, 24, 18), 1)])
def test_matches_brute_force(shape, connectivity):
    rng = np.random.default_rng(1)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 2)
    label = (smooth > 0.02).astype(int)
    np.testing.assert_allclose(
        unet_weight_map(label, connectivity=connectivity), brute_force(label, connectivity=connectivity), atol=1e-5
    )


def test_array_and_dictionary_transforms_keep_metadata():
    label = MetaTensor(torch.tensor([[[1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]]]), meta={"filename_or_obj": "l.png"})
    w = UNetWeightMap()(label)
    assert isinstance(w, MetaTensor) and w.dtype == torch.float32 and w.shape == (1, 1, 7)
    assert w.meta["filename_or_obj"] == "l.png"
    d = UNetWeightMapd(keys="label", weight_keys="weight")({"label": label, "image": 1})
    assert torch.equal(d["weight"], w) and d["image"] == 1
    with pytest.raises(KeyError, match="label"):
        UNetWeightMapd(keys="label")({"image": 1})


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"label must have shape \(1, \*spatial\)"):
        UNetWeightMap()(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="`sigma` > 0"):
        unet_weight_map(np.zeros((4, 4)), sigma=0)
    with pytest.raises(ValueError, match="`class_weights` must be"):
        unet_weight_map(np.zeros((4, 4)), class_weights=(1, 2, 3))
