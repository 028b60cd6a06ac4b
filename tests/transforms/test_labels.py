from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from pipelines.io import GridMismatchError
from pipelines.transforms import (
    LabelsToRegions,
    LabelsToRegionsd,
    LabelValueError,
    MapLabels,
    MapLabelsd,
    RegionsToLabels,
)

BRATS_2023_REGIONS = [[1, 2, 3], [1, 3], [3]]  # WT, TC, ET


def _label(values, affine=None, name="case-seg.nii.gz") -> MetaTensor:
    return MetaTensor(torch.tensor(values, dtype=torch.float32)[None],
                      affine=torch.eye(4) if affine is None else affine, meta={"filename_or_obj": name})


def test_brats_2021_labels_map_into_the_2023_convention():
    label = _label([[0, 1, 2, 4], [4, 2, 1, 0]])
    mapped = MapLabels([0, 1, 2, 3], {"4": 3})(label)  # JSON keys are strings
    assert mapped.dtype == torch.uint8 and mapped.tolist() == [[[0, 1, 2, 3], [3, 2, 1, 0]]]
    assert torch.equal(mapped.affine, label.affine) and mapped.meta["filename_or_obj"] == "case-seg.nii.gz"


def test_values_outside_the_convention_are_refused_naming_the_file_and_values():
    label = _label([[0, 1, 2, 4], [4, 7, 1, 0]])
    with pytest.raises(LabelValueError, match=r"case-seg.nii.gz: label values 4 \(2 voxels\), 7 \(1 voxels\) are "
                                              r"outside the convention \[0, 1, 2, 3\]; map them with `label_map`"):
        MapLabelsd("label", [0, 1, 2, 3])({"label": label})
    with pytest.raises(LabelValueError, match=r"7 \(1 voxels\) are outside .* after label_map \{4: 3\}"):
        MapLabels([0, 1, 2, 3], {4: 3})(label, "case-seg.nii.gz")
    with pytest.raises(LabelValueError, match="non-integer values"):
        MapLabels([0, 1])(_label([[0.0, 0.4]]))
    with pytest.raises(ValueError, match=r"`label_map` maps to \[5\]"):
        MapLabels([0, 1, 2, 3], {4: 5})


def test_a_label_on_another_grid_than_the_reference_is_refused():
    image = _label([[0, 0, 0, 0]], name="t1n.nii.gz")
    shifted = torch.eye(4)
    shifted[0, 3] = 1.0
    with pytest.raises(GridMismatchError, match="case-seg.nii.gz: label grid differs from t1n t1n.nii.gz"):
        MapLabelsd("label", [0, 1, 2, 3], reference_key="t1n")({"t1n": image, "label": _label([[0, 1, 2, 3]], shifted)})


def test_regions_from_labels_and_back():
    labels = torch.tensor([[0, 1, 2, 3, 2, 0]], dtype=torch.uint8)
    regions = LabelsToRegions(BRATS_2023_REGIONS)(labels)
    assert regions.dtype == torch.uint8 and regions.tolist() == [
        [0, 1, 1, 1, 1, 0],  # WT: NCR, ED, ET
        [0, 1, 0, 1, 0, 0],  # TC: NCR, ET
        [0, 0, 0, 1, 0, 0],  # ET
    ]
    # nested regions painted in the order WT, TC, ET give the labels back
    assert torch.equal(RegionsToLabels([2, 1, 3])(regions.float()), labels.float())
    data = LabelsToRegionsd("label", BRATS_2023_REGIONS)({"label": _label(np.zeros((2, 3)))})
    assert data["label"].shape == (3, 2, 3) and isinstance(data["label"], MetaTensor)
    with pytest.raises(ValueError, match="label must have shape"):
        LabelsToRegions(BRATS_2023_REGIONS)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least one region"):
        LabelsToRegions([[1], []])
