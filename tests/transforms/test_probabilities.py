from __future__ import annotations

import pytest
import torch

from pipelines.transforms import FillBackground, FillBackgroundd, RegionsToLabels, RegionsToLabelsd


def test_background_takes_what_the_classes_leave():
    probabilities = torch.tensor([[0.2, 0.0], [0.5, 0.0], [0.3, 0.0]])  # (C, voxels): the second was cropped away
    filled = FillBackground()(probabilities)
    assert torch.allclose(filled, torch.tensor([[0.2, 1.0], [0.5, 0.0], [0.3, 0.0]]))
    assert torch.allclose(FillBackgroundd("p", channel=2)({"p": probabilities})["p"][2], torch.tensor([0.3, 1.0]))
    with pytest.raises(ValueError, match="channel 5"):
        FillBackground(5)(probabilities)


def test_nested_regions_paint_labels_in_order():
    """BraTS: whole tumor, tumor core, enhancing tumor -> edema 2, necrosis 1, enhancing 3."""
    wt = torch.tensor([0.9, 0.9, 0.9, 0.1])
    tc = torch.tensor([0.1, 0.8, 0.8, 0.1])
    et = torch.tensor([0.1, 0.2, 0.7, 0.6])  # the last voxel: enhancing outside the whole tumor
    labels = RegionsToLabels([2, 1, 3])(torch.stack([wt, tc, et]))
    assert labels.tolist() == [[2, 1, 3, 3]]
    assert RegionsToLabelsd("pred", values=[2, 1, 3], threshold=0.85)({"pred": torch.stack([wt, tc, et])})["pred"].tolist() == [[2, 2, 2, 0]]
    with pytest.raises(ValueError, match="C = 3 channels"):
        RegionsToLabels([2, 1, 3])(torch.stack([wt, tc]))
    with pytest.raises(ValueError, match="positive label values"):
        RegionsToLabels([0, 1])
