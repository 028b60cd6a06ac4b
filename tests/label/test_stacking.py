"""A multi-parametric bundle's preprocessing for MONAI Label's one image per case."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from pipelines.label.stacking import (
    CheckChannels,
    fitting_datalist,
    image_layout,
    stacked_channels,
    stacked_training_transforms,
)
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


def _bundle_input(name: str) -> tuple[int, int]:
    image = json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())
    image = image["network_data_format"]["inputs"]["image"]
    return len(image["spatial_shape"]), image["num_channels"]


def _mixed_datastore(tmp_path) -> dict[str, str]:
    """The images one MONAI Label datastore holds when it serves all three bundles."""
    from PIL import Image

    four, _ = _case(tmp_path, channels=4)
    paths = {"stack": four}
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 10), np.int16), np.eye(4)), tmp_path / "ct.nii.gz")
    paths["ct"] = tmp_path / "ct.nii.gz"
    (tmp_path / "1.2.3.4").mkdir()  # a DICOM series of a DICOMweb datastore: a folder of files
    paths["series"] = tmp_path / "1.2.3.4"
    Image.fromarray(np.zeros((12, 14), np.uint8)).save(tmp_path / "em.tif")
    paths["em"] = tmp_path / "em.tif"
    Image.fromarray(np.zeros((12, 14, 3), np.uint8)).save(tmp_path / "photo.png")
    paths["photo"] = tmp_path / "photo.png"
    (tmp_path / "broken.nii.gz").write_bytes(b"not a NIfTI")
    paths["broken"] = tmp_path / "broken.nii.gz"
    return {name: str(path) for name, path in paths.items()}


def test_image_layout_reads_dimensions_and_channels_from_the_header(tmp_path):
    paths = _mixed_datastore(tmp_path)
    layouts = {name: image_layout(path) for name, path in paths.items()}
    assert layouts == {"stack": (3, 4), "ct": (3, 1), "series": (3, 1), "em": (2, 1), "photo": (2, 3),
                       "broken": None}


@pytest.mark.parametrize(("bundle", "kept"), [
    ("unet3d_brain_tumor", {"stack", "broken"}),
    ("unet3d_tumor", {"ct", "series", "broken"}),
    ("unet2d_isbi2012", {"em", "broken"}),
])
def test_each_bundle_trains_only_on_the_images_it_takes(tmp_path, caplog, bundle, kept):
    """One datastore serving every bundle: a bundle's training leaves out the others' images, each
    named; an unreadable image stays for the bundle's loader to name."""
    paths = _mixed_datastore(tmp_path)
    datalist = [{"image": path, "label": f"{path}.label"} for path in paths.values()]
    with caplog.at_level("WARNING"):
        fitted = fitting_datalist(datalist, *_bundle_input(bundle), bundle)
    assert {name for name, path in paths.items() if {"image": path, "label": f"{path}.label"} in fitted} == kept
    left_out = set(paths) - kept
    assert f"{len(left_out)} labelled images left out" in caplog.text
    assert all(paths[name] in caplog.text for name in left_out)
    assert not any(paths[name] in caplog.text for name in kept - {"broken"})


def test_a_bundle_with_no_fitting_image_is_refused_naming_the_images(tmp_path):
    paths = _mixed_datastore(tmp_path)
    datalist = [{"image": paths[name], "label": "x"} for name in ("ct", "photo")]
    with pytest.raises(ValueError, match=r"unet3d_brain_tumor: none of the 2 labelled images is a 3D image of 4 "
                                         r"channels: .*ct\.nii\.gz \(3D, 1 channel\); .*photo\.png \(2D, 3 channels\)"):
        fitting_datalist(datalist, 3, 4, "unet3d_brain_tumor")
    assert fitting_datalist([], 3, 4, "unet3d_brain_tumor") == []
