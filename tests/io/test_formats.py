from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from pipelines.io import CorruptFileError, InvalidValuesError, dicom_references, load_volume
from tests.io.dicom_factory import SeriesSpec, read_slices, write_series


def oblique_affine() -> np.ndarray:
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.8, 2.5])
    affine[:3, 3] = [-10.5, 20.25, -30.0]
    return affine


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_is_exact(tmp_path, dtype, suffix):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(9, 8, 7)) * 100).astype(dtype)
    path = tmp_path / f"image{suffix}"
    nib.save(nib.Nifti1Image(data, oblique_affine()), path)
    volume = load_volume(path)
    assert volume.shape == (1, 9, 8, 7) and volume.numpy().dtype == dtype
    assert np.array_equal(volume[0].numpy(), data)
    assert np.allclose(volume.affine.numpy(), oblique_affine())
    np.testing.assert_allclose(volume.meta["spacing"], [0.7, 0.8, 2.5])
    assert volume.meta["source_format"] == "nifti" and volume.meta["dicom"] == "{}"


@pytest.mark.parametrize("stored, loaded", [(np.uint16, np.int32), (np.uint32, np.int64), (np.uint64, np.int64)])
def test_wide_unsigned_voxels_widen_to_what_torch_can_reorient(tmp_path, stored, loaded):
    """dcm2niix and ITK write uint16 NIfTI; torch cannot flip uint16, so Orientation would fail."""
    from monai.transforms import Orientation

    data = np.arange(4 * 5 * 6, dtype=stored).reshape(4, 5, 6) * 1000
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS: reorienting to RAS flips the first axis
    nib.save(nib.Nifti1Image(data, affine, dtype=stored), tmp_path / "u.nii.gz")
    volume = load_volume(tmp_path / "u.nii.gz")
    assert volume.numpy().dtype == loaded and np.array_equal(volume[0].numpy(), data)
    assert np.array_equal(Orientation("RAS")(volume)[0].numpy(), data[::-1])


def test_uint64_beyond_int64_is_refused(tmp_path):
    data = np.full((2, 2, 2), np.iinfo(np.uint64).max, dtype=np.uint64)
    nib.save(nib.Nifti1Image(data, np.eye(4), dtype=np.uint64), tmp_path / "huge.nii.gz")
    with pytest.raises(InvalidValuesError, match=r"huge.nii.gz: uint64 voxel values above"):
        load_volume(tmp_path / "huge.nii.gz")


def test_nifti_channels_and_scaling(tmp_path):
    data = np.arange(2 * 3 * 4 * 3, dtype=np.int16).reshape(2, 3, 4, 3)
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, tmp_path / "multi.nii.gz")
    volume = load_volume(tmp_path / "multi.nii.gz")
    assert volume.shape == (3, 2, 3, 4) and volume.numpy().dtype == np.float32  # last axis -> channels
    assert np.allclose(volume.numpy(), np.moveaxis(data * 0.5 + 10.0, -1, 0))


def test_nifti_with_nan_or_inf_is_refused(tmp_path):
    data = np.ones((4, 4, 4), np.float32)
    data[1, 1, 1], data[2, 2, 2] = np.nan, np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "bad.nii.gz")
    with pytest.raises(InvalidValuesError, match=r"bad.nii.gz: 1 NaN and 1 infinite voxels"):
        load_volume(tmp_path / "bad.nii.gz")
    assert load_volume(tmp_path / "bad.nii.gz", allow_nonfinite=True).isnan().sum() == 1


def test_truncated_nifti(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), tmp_path / "t.nii")
    data = (tmp_path / "t.nii").read_bytes()
    (tmp_path / "t.nii").write_bytes(data[:1000])
    with pytest.raises(CorruptFileError, match=r"t.nii: unreadable NIfTI file"):
        load_volume(tmp_path / "t.nii")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_formats_match_their_geometry(tmp_path, suffix):
    rng = np.random.default_rng(1)
    data = rng.integers(-1000, 1000, size=(7, 8, 9)).astype(np.int16)  # (Z, Y, X) as SimpleITK stores
    image = sitk.GetImageFromArray(data)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    direction = oblique_affine()[:3, :3] / np.array([0.7, 0.8, 2.5])
    image.SetDirection(direction.flatten().tolist())
    sitk.WriteImage(image, str(tmp_path / f"image{suffix}"))
    volume = load_volume(tmp_path / f"image{suffix}")
    assert np.array_equal(volume[0].numpy(), data.transpose(2, 1, 0))
    # voxel (i, j, k) sits where SimpleITK puts it, converted from LPS to RAS
    for index in [(0, 0, 0), (8, 7, 6), (3, 5, 2)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = volume.affine.numpy() @ np.array([*index, 1.0])
        assert np.allclose(ras[:3], lps * [-1, -1, 1])


def test_enhanced_multiframe_matches_the_single_frame_series(tmp_path):
    paths = write_series(tmp_path / "single", SeriesSpec(orientation="oblique"), shuffle=True)
    legacy = read_slices(paths)
    enhanced = LegacyConvertedEnhancedCTImage(
        legacy_datasets=legacy, series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1,
    )
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    single = load_volume(tmp_path / "single")
    multi = load_volume(tmp_path / "enhanced.dcm")
    assert np.array_equal(multi.numpy(), single.numpy())
    assert np.allclose(multi.affine, single.affine)
    references = dicom_references(multi.meta)
    assert references["sop_instance_uids"] == [enhanced.SOPInstanceUID] * 7
    frame_positions = [
        float(enhanced.PerFrameFunctionalGroupsSequence[f - 1].PlanePositionSequence[0].ImagePositionPatient[2])
        for f in references["frame_numbers"]
    ]
    assert frame_positions == sorted(frame_positions) or frame_positions == sorted(frame_positions, reverse=True)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_pydicom_sample_files(name):
    path = get_testdata_file(name, download=False)
    ds = pydicom.dcmread(path)
    volume = load_volume(path)
    expected = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    assert np.array_equal(volume[0, :, :, 0].numpy(), expected.T.astype(np.float32))
    ipp_ras = np.asarray(ds.ImagePositionPatient, float) * [-1, -1, 1]
    assert np.allclose(volume.affine.numpy()[:3, 3], ipp_ras)
    assert volume.meta["modality"] == ds.Modality


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "standard.nii.gz",
                                  "reoriented_anat_moved.nii"])
def test_nibabel_sample_files(name):
    from nibabel.testing import data_path

    path = f"{data_path}/{name}"
    image = nib.load(path)
    expected = np.asarray(image.dataobj)
    volume = load_volume(path, allow_nonfinite=True)
    channels = expected.shape[3] if expected.ndim == 4 else 1
    assert volume.shape == (channels, *expected.shape[:3])
    first = volume[0].numpy()
    np.testing.assert_allclose(first, expected[..., 0] if expected.ndim == 4 else expected, rtol=1e-6)
    np.testing.assert_allclose(volume.affine.numpy(), image.affine, atol=1e-6)


@pytest.mark.parametrize("mode, channels", [("L", 1), ("I;16", 1), ("RGB", 3)])
def test_pictures_load_as_monai_loads_them(tmp_path, mode, channels):
    """x along the columns, as MONAI's LoadImage (PIL reader) gives them: a bundle trained on
    LoadImage's arrays sees the same pixels through load_volume."""
    from monai.transforms import EnsureChannelFirst, LoadImage
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (13, 17, 3) if channels == 3 else (13, 17)
    pixels = rng.integers(0, 250 if mode != "I;16" else 4000, shape).astype(np.uint16 if mode == "I;16" else np.uint8)
    path = tmp_path / "section.png"
    Image.fromarray(pixels).save(path)
    ours = load_volume(path)
    theirs = EnsureChannelFirst()(LoadImage(image_only=True)(path))
    assert ours.shape == (channels, 17, 13) == tuple(theirs.shape)
    assert np.array_equal(ours.numpy(), theirs.numpy()) and ours.meta["source_format"] == "picture"


def test_a_multi_page_tiff_is_a_stack(tmp_path):
    from PIL import Image

    pages = [np.full((5, 7), k, dtype=np.uint8) for k in range(4)]
    Image.fromarray(pages[0]).save(tmp_path / "stack.tif", save_all=True,
                                   append_images=[Image.fromarray(p) for p in pages[1:]])
    volume = load_volume(tmp_path / "stack.tif")
    assert volume.shape == (1, 7, 5, 4) and [int(volume[0, 0, 0, k]) for k in range(4)] == [0, 1, 2, 3]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(CorruptFileError, match=r"broken\.png: unreadable picture"):
        load_volume(tmp_path / "broken.png")
