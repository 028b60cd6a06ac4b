from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from pipelines.metrics import rand_error
from pipelines.transforms import MembraneWatershed, MembraneWatershedd, membrane_watershed


def two_cells_with_a_gap(gap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A vertical membrane (probability 0.9) between two cells (0.05), broken in the middle when ``gap``."""
    truth = np.ones((40, 41), np.uint8)
    truth[:, 19:22] = 0
    probability = np.where(truth == 0, 0.9, 0.05).astype(np.float32)
    if gap:
        probability[18:22, 19:22] = 0.3  # the network hesitates: below the threshold
    return probability, truth


def test_closes_a_gap_that_thresholding_leaves():
    probability, truth = two_cells_with_a_gap()
    thresholded = (probability <= 0.5).astype(np.uint8)
    assert ndimage.label(thresholded, ndimage.generate_binary_structure(2, 1))[1] == 1  # the two cells merged
    result = membrane_watershed(probability, threshold=0.5, seed_threshold=0.2, min_seed_size=20, sigma=1.0)
    assert ndimage.label(result, ndimage.generate_binary_structure(2, 1))[1] == 2
    assert rand_error(result, truth) < rand_error(thresholded, truth)
    assert np.mean(result != truth) < 0.02  # membranes stay where they were


def test_no_gap_keeps_the_thresholded_map():
    probability, truth = two_cells_with_a_gap(gap=False)
    result = membrane_watershed(probability, threshold=0.5, sigma=0.0)
    assert np.array_equal(result, truth)


@pytest.mark.parametrize("dims", [2, 3])
def test_small_seeds_do_not_split_a_cell(dims):
    """An island of low probability inside a cell, ringed by moderate probability (still cell):
    seeded, it would get a watershed line around it and split the cell in two."""
    shape = (24,) * dims
    probability = np.full(shape, 0.9, np.float32)
    inner = tuple(slice(2, 22) for _ in range(dims))
    probability[inner] = 0.05
    probability[tuple(slice(9, 15) for _ in range(dims))] = 0.4  # the ring...
    probability[tuple(slice(11, 13) for _ in range(dims))] = 0.05  # ...around a tiny island
    connectivity = ndimage.generate_binary_structure(dims, 1)
    kept = membrane_watershed(probability, threshold=0.5, min_seed_size=20, sigma=0.0)
    assert ndimage.label(kept, connectivity)[1] == 1
    split = membrane_watershed(probability, threshold=0.5, min_seed_size=1, sigma=0.0)
    assert ndimage.label(split, connectivity)[1] == 2


def test_array_and_dictionary_transforms():
    probability, _ = two_cells_with_a_gap()
    softmax = MetaTensor(torch.from_numpy(np.stack([probability, 1 - probability])), meta={"filename_or_obj": "s.png"})
    out = MembraneWatershed(membrane_channel=0)(softmax)
    assert out.shape == (1, 40, 41) and isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "s.png"
    d = MembraneWatershedd(keys="pred", membrane_channel=0)({"pred": softmax})
    assert torch.equal(d["pred"], out)


def test_bad_arguments():
    with pytest.raises(ValueError, match="0 < seed_threshold <= threshold <= 1"):
        MembraneWatershed(threshold=0.3, seed_threshold=0.5)
    with pytest.raises(ValueError, match=r"shape \(C, \*spatial\) with channel 2"):
        MembraneWatershed(membrane_channel=2)(np.zeros((2, 4, 4)))
