from __future__ import annotations

import dataclasses
import os

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from pipelines.io import InputDataError, dicom_references, load_volume
from pipelines.io.dicom_seg import SegmentCode, segments_from_metadata, write_dicom_seg
from pipelines.io.rtstruct import write_rtstruct
from pipelines.io.writers import atomic_path, labels_on_source_slices, resample_labels, save_nifti
from tests.dicom_checks import dciodvfy_errors
from tests.io.dicom_factory import SeriesSpec, pixel_positions, read_slices, write_series

TUMOR = SegmentCode(1, "tumor", ("49755003", "SCT", "Morphologically Altered Structure"), ("108369006", "SCT", "Neoplasm"))
EDEMA = SegmentCode(2, "edema", ("49755003", "SCT", "Morphologically Altered Structure"), ("79654002", "SCT", "Edema"))
CENTRE = np.array([-16.0, -26.0, 47.0])  # LPS mm, inside the synthetic series


def sphere_labels(volume) -> np.ndarray:
    """Label 1 inside 3 mm of CENTRE, 2 in the shell out to 5 mm, on the volume's grid."""
    index = np.indices(volume.shape[1:]).reshape(3, -1)
    ras = (volume.affine.numpy() @ np.r_[index, np.ones((1, index.shape[1]))])[:3]
    distance = np.linalg.norm(ras.T * [-1, -1, 1] - CENTRE, axis=1).reshape(volume.shape[1:])
    return np.where(distance <= 3, 1, np.where(distance <= 5, 2, 0)).astype(np.uint8)


def test_save_nifti_round_trip_and_atomicity(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4, size=(9, 8, 7)).astype(np.uint8)
    affine = np.array([[0.7, 0.1, 0, -5], [0, 0.8, 0, 7], [0, 0, 2.5, 3], [0, 0, 0, 1.0]])
    path = save_nifti(data[None], affine, tmp_path / "out" / "mask.nii.gz")
    loaded = load_volume(path)
    assert np.array_equal(loaded[0].numpy(), data) and loaded.numpy().dtype == np.uint8
    np.testing.assert_allclose(loaded.affine.numpy(), affine, atol=1e-5)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mask.nii.gz"]
    before = path.read_bytes()
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == before and [p.name for p in (tmp_path / "out").iterdir()] == ["mask.nii.gz"]
    with pytest.raises(ValueError, match=r"must have shape \(X, Y, Z\) or \(C, X, Y, Z\)"):
        save_nifti(np.zeros((2, 2)), affine, tmp_path / "bad.nii.gz")


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_nifti(np.zeros((2, 2, 2), np.uint8), np.eye(4), tmp_path / "mask.nii.gz")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by the PACS user, not only the owner


@pytest.mark.parametrize("spec", [SeriesSpec(orientation="oblique"), SeriesSpec(in_plane_shift=(0.0, 0.3)),
                                  SeriesSpec(slice_positions=[0.0, 2.5, 5.0, 7.0, 9.5, 12.0])])
def test_labels_return_to_the_source_slices(tmp_path, spec):
    paths = write_series(tmp_path, spec)
    volume = load_volume(tmp_path)
    frames = labels_on_source_slices(sphere_labels(volume), volume.affine.numpy(), dicom_references(volume.meta)["source_geometry"])
    by_position = {tuple(ds.ImagePositionPatient): ds for ds in read_slices(paths)}
    geometry = dicom_references(volume.meta)["source_geometry"]
    for frame, position in zip(frames, geometry["positions"]):
        ds = by_position[tuple(position)]
        distance = np.linalg.norm(pixel_positions(spec, np.asarray(position)) - CENTRE, axis=-1)
        sure = (distance < 2.3) | ((distance > 3.7) & (distance < 4.3)) | (distance > 5.7)  # a voxel from any border
        expected = np.where(distance <= 3, 1, np.where(distance <= 5, 2, 0))
        assert np.array_equal(frame[sure], expected[sure]), ds.filename


@pytest.mark.parametrize("spec", [SeriesSpec(rows=24, columns=20), SeriesSpec(rows=24, columns=20, in_plane_shift=(0.0, 0.3))])
def test_dicom_seg_references_the_source_and_validates(tmp_path, spec):
    paths = write_series(tmp_path / "ct", spec, shuffle=True)
    volume = load_volume(tmp_path / "ct")
    labels = sphere_labels(volume)
    written = write_dicom_seg(labels, volume.meta, [TUMOR, EDEMA], tmp_path / "seg.dcm", "unet3d_tumor", "0.1.0")
    out = tmp_path / "seg.dcm"
    assert written.SOPInstanceUID == hd.seg.segread(out).SOPInstanceUID  # the dataset written is returned
    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "BINARY" and seg.SeriesInstanceUID != volume.meta["series_instance_uid"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["tumor", "edema"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Edema"
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "unet3d_tumor"
    sources = {ds.SOPInstanceUID: ds for ds in read_slices(paths)}
    assert {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(sources)
    # every frame holds its source slice's labels
    frames = labels_on_source_slices(labels, volume.affine.numpy(), dicom_references(volume.meta)["source_geometry"])
    uids = dicom_references(volume.meta)["sop_instance_uids"]
    for number, segment in ((1, TUMOR), (2, EDEMA)):
        for uid, expected in zip(uids, frames):
            mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], segment_numbers=[number],
                                                     ignore_spatial_locations=True)[0, :, :, 0]
            assert np.array_equal(mask.astype(bool), expected == segment.label)
    errors = dciodvfy_errors(out)
    assert not errors, "\n".join(errors)


def test_dicom_seg_without_empty_frames(tmp_path):
    spec = SeriesSpec(rows=24, columns=20)
    write_series(tmp_path / "ct", spec)
    volume = load_volume(tmp_path / "ct")
    labels = sphere_labels(volume)
    write_dicom_seg(labels, volume.meta, [TUMOR, EDEMA], tmp_path / "seg.dcm", "u", "1", omit_empty_frames=True)
    out = tmp_path / "seg.dcm"
    frames = labels_on_source_slices(labels, volume.affine.numpy(), dicom_references(volume.meta)["source_geometry"])
    present = sum(int((frames == s.label).any(axis=(1, 2)).sum()) for s in (TUMOR, EDEMA))
    assert 0 < hd.seg.segread(out).NumberOfFrames == present < 2 * len(frames)
    # nothing segmented: still a valid SEG (empty frames kept, as one frame at least is required)
    empty = write_dicom_seg(np.zeros_like(labels), volume.meta, [TUMOR], tmp_path / "e.dcm", "u", "1", omit_empty_frames=True)
    assert empty.NumberOfFrames == hd.seg.segread(tmp_path / "e.dcm").NumberOfFrames == len(frames)


def test_a_long_bundle_name_is_cut_to_what_dicom_keeps(tmp_path):
    write_series(tmp_path / "ct", SeriesSpec(rows=12, columns=10))
    volume = load_volume(tmp_path / "ct")
    name = "U-Net 3D brain tumor segmentation (multi-parametric MR, BraTS regions)"  # 71 characters
    write_dicom_seg(sphere_labels(volume), volume.meta, [TUMOR], tmp_path / "s.dcm", name, "1")
    seg = hd.seg.segread(tmp_path / "s.dcm")
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == name[:64]
    assert seg.ManufacturerModelName == name[:64]


def test_highdicom_iod_lookups_are_memoised(tmp_path, monkeypatch):
    """highdicom scans the standard's tables for each source image; after the first SEG the answers
    come from the cache, and they are the scan's answers."""
    from highdicom import _standard_utils as standard

    scanned = []
    scan = getattr(standard.is_attribute_in_iod, "__wrapped__", standard.is_attribute_in_iod)

    def counting_scan(*args, **kwargs):
        scanned.append(args)
        return scan(*args, **kwargs)

    monkeypatch.setattr(standard, "is_attribute_in_iod", counting_scan)
    write_series(tmp_path / "ct", SeriesSpec(rows=12, columns=10))
    volume = load_volume(tmp_path / "ct")
    labels = sphere_labels(volume)
    write_dicom_seg(labels, volume.meta, [TUMOR], tmp_path / "a.dcm", "u", "1")
    # highdicom asks per source image (7 here); each distinct question was scanned once
    assert standard.is_attribute_in_iod.memoised and 0 < len(scanned) == len(set(scanned)) < volume.shape[-1]
    first = len(scanned)
    write_dicom_seg(labels, volume.meta, [TUMOR, EDEMA], tmp_path / "b.dcm", "u", "1")
    assert len(scanned) == first  # every lookup answered from the cache
    memoised = standard.is_attribute_in_iod
    for sop in (pydicom.uid.CTImageStorage, pydicom.uid.MRImageStorage, pydicom.uid.SegmentationStorage,
                pydicom.uid.EnhancedCTImageStorage):
        for attribute in ("PixelData", "NumberOfFrames", "FloatPixelData", "ContentDate", "NoSuchKeyword"):
            for exclude in (None, ["IconImageSequence"], ("IconImageSequence",)):
                assert memoised(attribute, sop, exclude) == scan(attribute, sop, exclude), (attribute, sop, exclude)
    with pytest.raises(KeyError, match="No IOD found"):
        memoised("PixelData", "1.2.3.4")


def test_dicom_seg_needs_a_dicom_source(tmp_path):
    path = save_nifti(np.zeros((4, 4, 4), np.uint8), np.eye(4), tmp_path / "image.nii.gz")
    volume = load_volume(path)
    with pytest.raises(InputDataError, match="image.nii.gz: DICOM SEG needs a DICOM source, got nifti"):
        write_dicom_seg(volume[0].numpy(), volume.meta, [TUMOR], tmp_path / "seg.dcm", "x", "1")
    with pytest.raises(InputDataError, match="image.nii.gz: an RTSTRUCT needs a DICOM source, got nifti"):
        write_rtstruct(volume[0].numpy(), volume.meta, [TUMOR], tmp_path / "rt.dcm", "x", "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.nii.gz"]


def test_segments_from_bundle_metadata():
    meta = {"dicom_seg_segments": [{"label": 1, "name": "tumor", "category": list(TUMOR.category), "type": list(TUMOR.type)}]}
    assert segments_from_metadata(meta) == [TUMOR]
    with pytest.raises(ValueError, match="no `dicom_seg_segments`"):
        segments_from_metadata({})
    meta["dicom_seg_segments"][0]["color"] = [230, 60, 50]
    assert segments_from_metadata(meta)[0].color == (230, 60, 50)
    for bad in ("red", [255, 0], [255, 0, 256], [1.5, 0, 0]):
        meta["dicom_seg_segments"][0]["color"] = bad
        with pytest.raises(ValueError, match="color must be \\[r, g, b\\], whole numbers 0-255"):
            segments_from_metadata(meta)


def test_segment_colours_reach_the_seg(tmp_path):
    write_series(tmp_path / "ct", SeriesSpec(rows=24, columns=20))
    volume = load_volume(tmp_path / "ct")
    red = dataclasses.replace(TUMOR, color=(255, 0, 0))
    write_dicom_seg(sphere_labels(volume), volume.meta, [red, EDEMA], tmp_path / "s.dcm", "u", "1")
    seg = hd.seg.segread(tmp_path / "s.dcm")
    assert hd.color.CIELabColor.from_dicom_value(seg.SegmentSequence[0].RecommendedDisplayCIELabValue).to_rgb() == (255, 0, 0)
    assert "RecommendedDisplayCIELabValue" not in seg.SegmentSequence[1]


def test_prediction_on_a_resampled_grid_returns_to_the_source_grid(tmp_path):
    from monai.transforms import Orientation, Spacing

    write_series(tmp_path / "ct", SeriesSpec(orientation="oblique", rows=24, columns=20))
    source = load_volume(tmp_path / "ct")
    truth = sphere_labels(source)
    labelled = source.clone()
    labelled[0] = torch.from_numpy(truth.astype(np.float32))
    working = Spacing(pixdim=(0.5, 0.5, 0.5), mode="nearest")(Orientation(axcodes="RAS")(labelled))  # model's grid
    back = resample_labels(working[0].numpy(), working.affine.numpy(), source.shape[1:], source.affine.numpy())
    assert back.shape == truth.shape
    assert np.mean(back == truth) > 0.99  # nearest neighbour twice: only sphere-border voxels may flip
    path = save_nifti(back, source.affine.numpy(), tmp_path / "mask.nii.gz", dtype=np.uint8)
    written = load_volume(path)
    assert written.shape == source.shape and np.allclose(written.affine.numpy(), source.affine.numpy(), atol=1e-5)


def test_label_sampling_in_chunks_equals_one_pass(tmp_path, monkeypatch):
    from pipelines.io import writers

    write_series(tmp_path / "ct", SeriesSpec(orientation="oblique", rows=24, columns=20))
    source = load_volume(tmp_path / "ct")
    truth, affine = sphere_labels(source), source.affine.numpy()
    geometry = dicom_references(source.meta)["source_geometry"]
    target = affine @ np.diag([0.7, 0.7, 0.7, 1.0])  # a finer grid than the source's
    whole = (resample_labels(truth, affine, (31, 29, 23), target), labels_on_source_slices(truth, affine, geometry))
    monkeypatch.setattr(writers, "_PLANE_CHUNK", 3 * 24 * 20 - 1)  # 2 planes per step: chunk edges everywhere
    chunked = (resample_labels(truth, affine, (31, 29, 23), target), labels_on_source_slices(truth, affine, geometry))
    assert whole[0].any() and whole[1].any()
    for one, many in zip(whole, chunked):
        assert np.array_equal(one, many)


def test_grid_aligned_planes_copied_by_index_equal_sampling(monkeypatch):
    """The index fast path (planes that are grid planes, as for an axial series on its own grid)
    gives what coordinate sampling gives: flips, any axis pair, rounding noise, planes partly or
    wholly outside the grid."""
    from pipelines.io import writers

    rng = np.random.default_rng(7)
    cases = []
    for _ in range(200):
        shape = tuple(int(n) for n in rng.integers(3, 12, 3))
        a, b = (int(i) for i in rng.choice(3, 2, replace=False))
        step_i, step_j = np.zeros(3), np.zeros(3)
        step_i[a], step_j[b] = rng.choice([-1.0, 1.0], 2)
        origins = np.zeros((int(rng.integers(1, 10)), 3))
        origins[:, 3 - a - b] = rng.integers(-3, shape[3 - a - b] + 3, len(origins))
        origins[:, a], origins[:, b] = rng.integers(-4, shape[a] + 4), rng.integers(-4, shape[b] + 4)
        noise = [rng.normal(0, 1e-6, v.shape) for v in (origins, step_i, step_j)]
        planes = (origins + noise[0], step_i + noise[1], step_j + noise[2], *(int(n) for n in rng.integers(1, 15, 2)))
        cases.append((rng.integers(0, 5, shape).astype(np.uint8), *planes))
    fast = [writers._labels_on_planes(*case) for case in cases]
    assert all(writers._copy_aligned_planes(*case[:4], np.zeros_like(f)) for case, f in zip(cases, fast))
    assert any(f.any() for f in fast) and any(not f.all() for f in fast)  # inside and outside both met
    monkeypatch.setattr(writers, "_copy_aligned_planes", lambda *args: False)
    for case, f in zip(cases, fast):
        assert np.array_equal(f, writers._labels_on_planes(*case))


def test_oblique_or_off_centre_planes_are_sampled():
    from pipelines.io import writers

    labels = np.ones((6, 6, 6), np.uint8)
    out = np.zeros((2, 4, 4), np.uint8)
    tilted = np.array([0.0, 0.995, 0.0998])
    assert not writers._copy_aligned_planes(labels, np.zeros((2, 3)), tilted, np.array([1.0, 0, 0]), out)
    assert not writers._copy_aligned_planes(labels, np.full((2, 3), 0.5), np.array([0, 1.0, 0]), np.array([1.0, 0, 0]), out)
    assert not out.any()


def test_nifti_units_are_mm_and_bytes_reproducible(tmp_path):

    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    first, second = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    save_nifti(data, np.diag([0.8, 0.8, 2.5, 1.0]), first)
    save_nifti(data, np.diag([0.8, 0.8, 2.5, 1.0]), second)
    assert nib.load(first).header.get_xyzt_units()[0] == "mm"
    assert first.read_bytes() == second.read_bytes()  # no timestamp or temporary name inside
