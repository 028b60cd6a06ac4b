"""A multi-parametric bundle's preprocessing for MONAI Label's one image per case."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from pipelines.label.stacking import CheckChannels, stacked_channels, stacked_training_transforms
from tests.conftest import REPO

BRAIN = REPO / "bundles" / "unet3d_brain_tumor"


def _parser(name: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_meta(str(BRAIN / "configs" / "metadata.json"))
    parser.read_config(str(BRAIN / "configs" / name))
    return parser


def _case(tmp_path, channels: int = 4, shape=(24, 28, 20)):
    """A 4D NIfTI of ``channels`` brain-like channels at 2 mm, and a label on its grid."""
    rng = np.random.default_rng(0)
    grid = np.indices(shape) - np.asarray(shape)[:, None, None, None] / 2
    brain = (grid**2).sum(0) < 8**2
    data = np.stack([np.where(brain, 500 + 100 * c, 0) + rng.normal(0, 5, shape) for c in range(channels)], -1)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), tmp_path / "case.nii.gz")
    label = np.where((grid**2).sum(0) < 3**2, 3, 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "label.nii.gz")
    return tmp_path / "case.nii.gz", tmp_path / "label.nii.gz"


def test_inference_reads_one_four_channel_file_and_inverts_onto_its_grid(tmp_path):
    from monai.transforms import Compose

    parser = _parser("inference.json")
    transforms = stacked_channels(list(parser.get_parsed_content("preprocessing").transforms))
    names = [type(t).__name__ for t in transforms]
    assert names[:3] == ["LoadVolumed", "CheckChannels", "Orientationd"] and "RegisterToReferenced" not in names
    image, _ = _case(tmp_path)
    data = Compose(transforms)({"image": str(image)})
    assert data["image"].shape[0] == 4 and data["image"].dtype == torch.float32
    data["pred"] = torch.zeros((3, *data["image"].shape[1:]))
    data["pred"] = type(data["image"])(data["pred"], meta=data["image"].meta,
                                       applied_operations=data["image"].applied_operations)
    post = parser.get_parsed_content("postprocessing").transforms
    out = Compose([t for t in post if type(t).__name__ != "SaveImaged"])(data)["pred"]
    assert tuple(out.shape[1:]) == (24, 28, 20)  # back on the file's grid
    with pytest.raises(RuntimeError, match="applying transform") as caught:  # MONAI's wrapper around the cause
        Compose(transforms)({"image": str(_case(tmp_path, channels=2)[0])})
    assert isinstance(caught.value.__cause__, ValueError)
    assert str(caught.value.__cause__).endswith("case.nii.gz: the bundle takes 4 channels (t1n, t1c, t2w, t2f), one "
                                                "multi-channel image in that order; this one has 2")
    # a single-input bundle's preprocessing is left alone
    tumor = ConfigParser()
    tumor.read_config(str(REPO / "bundles" / "unet3d_tumor" / "configs" / "inference.json"))
    plain = list(tumor.get_parsed_content("preprocessing").transforms)
    assert stacked_channels(plain) == plain


def test_training_transforms_take_the_image_and_label_of_monai_labels_datalist(tmp_path):
    from monai.transforms import Compose

    raw = json.loads((BRAIN / "configs" / "train.json").read_text())
    stacked = stacked_training_transforms(raw["deterministic_transforms"], raw["channels"])
    assert stacked[0] == {"_target_": "pipelines.transforms.LoadVolumed", "keys": ["image", "label"]}
    assert not any(str(item.get("_target_", "")).endswith(("ConcatItemsd", "DeleteItemsd", "RegisterToReferenced"))
                   for item in stacked)
    parser = _parser("train.json")
    parser["deterministic_transforms"] = stacked
    image, label = _case(tmp_path)
    data = Compose(parser.get_parsed_content("deterministic_transforms"))({"image": str(image), "label": str(label)})
    assert data["image"].shape[0] == 4 and data["label"].shape[0] == 3  # WT, TC, ET
    assert data["label"][2].sum() == data["label"][1].sum() > 0  # an enhancing core: ET = TC
    assert stacked_training_transforms(raw["deterministic_transforms"], ["t1n"]) is None
    tumor = json.loads((REPO / "bundles" / "unet3d_tumor" / "configs" / "train.json").read_text())
    assert stacked_training_transforms(tumor["deterministic_transforms"], []) is None


def test_check_channels_passes_the_right_count():
    data = {"image": torch.zeros(2, 3, 3, 3)}
    assert CheckChannels("image", ["t2f", "t1c"])(data) is data
