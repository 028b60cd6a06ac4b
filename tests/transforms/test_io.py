from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, decollate_batch, pad_list_data_collate
from monai.transforms import Compose, Orientationd, Spacingd
from pydicom.uid import generate_uid

from pipelines.io import AmbiguousSeriesError, GridMismatchError, InvalidValuesError, NoImageDataError, dicom_references
from pipelines.transforms import LoadVolume, LoadVolumed
from tests.io.dicom_factory import SeriesSpec, write_series


def write_nifti(path, shape=(10, 12, 7), affine=None, dtype=np.uint8):
    nib.save(nib.Nifti1Image(np.ones(shape, dtype), np.eye(4) if affine is None else affine), path)
    return path


def test_dicom_image_with_nifti_label_on_the_same_grid(tmp_path):
    write_series(tmp_path / "dicom", SeriesSpec())
    image = LoadVolume()(tmp_path / "dicom")
    label = write_nifti(tmp_path / "label.nii.gz", affine=image.affine.numpy())
    out = LoadVolumed(keys=["image", "label"], modality="CT")({"image": tmp_path / "dicom", "label": label, "id": 7})
    assert out["image"].shape == out["label"].shape == (1, 10, 12, 7) and out["id"] == 7


def test_label_on_another_grid_is_refused(tmp_path):
    write_series(tmp_path / "dicom", SeriesSpec())
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    for label, detail in [
        (write_nifti(tmp_path / "small.nii.gz", shape=(10, 12, 6)), r"shape \(10, 12, 6\) vs \(10, 12, 7\)"),
        (write_nifti(tmp_path / "moved.nii.gz", affine=shifted), "affine differs by up to"),
    ]:
        with pytest.raises(GridMismatchError, match=f"{label.name}: label grid differs from image .*dicom: {detail}"):
            LoadVolumed(keys=["image", "label"])({"image": tmp_path / "dicom", "label": label})
    LoadVolumed(keys=["image", "label"], check_grid=False)({"image": tmp_path / "dicom", "label": tmp_path / "small.nii.gz"})


def test_unknown_or_bad_options_fail_at_construction():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['modalities'\]"):
        LoadVolume(modalities="CT")
    with pytest.raises(ValueError, match="`orientation` must be one of"):
        LoadVolumed(keys="image", orientation="transverse")
    with pytest.raises(ValueError, match="`volume` must be a non-negative integer"):
        LoadVolumed(keys="image", volume=-1)


def test_volume_and_blank_options_reach_the_loader(tmp_path):
    series, study = generate_uid(), generate_uid()
    for t in (1, 2):  # one series, two time points
        write_series(tmp_path / f"t{t}", SeriesSpec(modality="MR", temporal_position=t, series_uid=series, study_uid=study))
    blank = write_nifti(tmp_path / "blank.nii.gz")
    with pytest.raises(InvalidValuesError, match="blank image"):
        LoadVolume(allow_blank=False)(blank)
    assert LoadVolume()(blank).shape == (1, 10, 12, 7)
    with pytest.raises(AmbiguousSeriesError, match="the series holds 2 volumes"):
        LoadVolume()(tmp_path)
    assert LoadVolume(volume=1)(tmp_path).shape == (1, 10, 12, 7)
    with pytest.raises(NoImageDataError, match="volume 2 asked"):
        LoadVolumed(keys="image", volume=2)({"image": tmp_path})


def test_batches_of_series_with_different_slice_counts_collate(tmp_path):
    """Metadata must survive MONAI's collation, also for DICOM series of different lengths."""
    write_series(tmp_path / "a", SeriesSpec(slice_positions=[0.0, 2.5, 5.0]))
    write_series(tmp_path / "b", SeriesSpec(slice_positions=[0.0, 2.5, 5.0, 7.5, 10.0], series_number=4))
    nifti = write_nifti(tmp_path / "c.nii.gz", shape=(10, 12, 4), dtype=np.float32)
    transform = Compose([
        LoadVolumed(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=(1.0, 1.0, 2.5)),
    ])
    data = [{"image": tmp_path / "a"}, {"image": tmp_path / "b"}, {"image": nifti}]
    batch = next(iter(DataLoader(Dataset(data, transform), batch_size=3, collate_fn=pad_list_data_collate)))
    assert batch["image"].shape[0] == 3
    first = decollate_batch(batch)[0]["image"]
    assert len(dicom_references(first.meta)["sop_instance_uids"]) == 3
    assert isinstance(first.meta["series_number"], (int, torch.Tensor))


def test_each_key_finds_its_own_series_in_one_study(tmp_path):
    """A multi-parametric study: one folder, each channel key picks its series by its own rules."""
    study = generate_uid()
    write_series(tmp_path / "t1", SeriesSpec(modality="MR", series_description="AX T1 3D", series_number=2,
                                             study_uid=study))
    write_series(tmp_path / "flair", SeriesSpec(modality="MR", series_description="AX T2 FLAIR", series_number=3,
                                                study_uid=study, rows=8, slice_positions=[4.0 * k for k in range(5)]))
    loader = LoadVolumed(["t1n", "t2f"], check_grid=False, modality="MR",
                         key_rules={"t1n": {"description": "(?i)t1"}, "t2f": {"description": "(?i)flair"}})
    data = loader({"t1n": tmp_path, "t2f": tmp_path})
    assert data["t1n"].shape == (1, 10, 12, 7) and data["t2f"].shape == (1, 10, 8, 5)
    assert loader.loaders["t2f"].rules.modality == "MR"  # the shared rules stay under each key's own
    with pytest.raises(AmbiguousSeriesError):  # without its rules, a key sees two series
        LoadVolumed("t1n", modality="MR")({"t1n": tmp_path})
    assert set(LoadVolumed(["t1n"], key_rules={"t1n": {}, "t1c": {}}).loaders) == {"t1n"}  # rules of channels not asked for
