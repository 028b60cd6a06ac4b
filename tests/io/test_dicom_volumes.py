"""Series that hold several volumes (4D, multi-echo, magnitude and phase), ``volume=k``, and instances
found twice."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from pipelines.io import (
    AmbiguousSeriesError,
    DuplicateInstanceError,
    NoImageDataError,
    geometry_corrections,
    load_volume,
)
from pipelines.io.dicom import SeriesRules, find_volumes, image_component
from tests.io.dicom_factory import SLOPE, SeriesSpec, make_slice

POSITIONS = [2.5 * k for k in range(5)]


def write_volumes(folder, count: int, spec: SeriesSpec | None = None, image_types=None, offsets=None,
                  instance_order: str = "volume", edit=None) -> list[list]:
    """``count`` volumes of one series at the same positions, told apart by nothing but InstanceNumber
    (unless ``edit(ds, volume)`` adds a field); volume v's stored values are raised by ``offsets[v]``."""
    spec = spec or SeriesSpec(slice_positions=POSITIONS, modality="MR")
    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    offsets = offsets or [100 * v for v in range(count)]
    paths = [[] for _ in range(count)]
    n = len(spec.slice_positions)
    for v in range(count):
        for k, s in enumerate(spec.slice_positions):
            ds = make_slice(spec, s, k, series, study, frame)
            ds.InstanceNumber = v * n + k + 1 if instance_order == "volume" else k * count + v + 1
            if image_types is not None:
                ds.ImageType = list(image_types[v])
            stored = np.frombuffer(ds.PixelData, dtype=np.int16) + np.int16(offsets[v])
            ds.PixelData = stored.astype(np.int16).tobytes()
            if edit is not None:
                edit(ds, v)
            path = folder / f"IM{ds.InstanceNumber:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths[v].append(path)
    return paths


def volume_offset(volume, reference) -> float:
    """How much higher ``volume``'s values are than ``reference``'s, in rescaled units."""
    difference = (volume.numpy() - reference.numpy()).round(3)
    assert np.unique(difference).size == 1
    return float(difference.flat[0])


@pytest.mark.parametrize("instance_order", ["volume", "slice"])  # GE numbers volume by volume; others slice by slice
def test_volumes_no_field_tells_apart_split_by_acquisition_order(tmp_path, instance_order):
    write_volumes(tmp_path, 3, instance_order=instance_order)
    with pytest.raises(AmbiguousSeriesError, match=r"the series holds 3 volumes; pass volume=k") as info:
        load_volume(tmp_path)
    message = str(info.value)
    assert "volume 0: " in message and "volume 2: " in message and "volume 3 in acquisition order" in message
    volumes = [load_volume(tmp_path, volume=k) for k in range(3)]
    assert all(v.shape == (1, 10, 12, 5) for v in volumes)
    assert [volume_offset(v, volumes[0]) for v in volumes] == [0.0, pytest.approx(100 * SLOPE), pytest.approx(200 * SLOPE)]
    with pytest.raises(NoImageDataError, match=r"volume 3 asked, but the series holds 3 volume\(s\)"):
        load_volume(tmp_path, volume=3)


def test_volumes_of_unequal_size_are_conflicting_slices_not_4d(tmp_path):
    paths = write_volumes(tmp_path, 2)
    for path in paths[1][1:]:
        path.unlink()  # one stray slice at a position the series already has
    from pipelines.io import GeometryError

    with pytest.raises(GeometryError, match="two different slices at position"):
        load_volume(tmp_path)


def test_a_field_that_tells_volumes_apart_is_used(tmp_path):
    def echo(ds, v):
        ds.EchoNumbers, ds.EchoTime = v + 1, 10.0 * (v + 1)

    write_volumes(tmp_path, 2, edit=echo, instance_order="slice")
    volumes = find_volumes(tmp_path)
    assert [c.split_by for c in volumes] == ["echo_number", "echo_number"]
    assert "echo_number 2" in volumes[1].describe()
    assert volume_offset(load_volume(tmp_path, volume=1), load_volume(tmp_path, volume=0)) == pytest.approx(100 * SLOPE)


def test_magnitude_is_preferred_to_phase_stored_in_the_same_series(tmp_path):
    types = [("ORIGINAL", "PRIMARY", "P", "ND"), ("ORIGINAL", "PRIMARY", "M", "ND")]
    write_volumes(tmp_path, 2, image_types=types)
    magnitude = load_volume(tmp_path)
    phase = load_volume(tmp_path, image_type_include=["P"])
    assert volume_offset(magnitude, phase) == pytest.approx(100 * SLOPE)  # the second volume written
    assert [c.component for c in find_volumes(tmp_path)] == ["phase", "magnitude"]
    assert volume_offset(load_volume(tmp_path, volume=0), phase) == 0.0  # volume counts every volume


def test_ge_direct_field_map_stores_the_field_map_first(tmp_path):
    """GE B0 maps hold the field map (Hz) and then the magnitude, with identical headers."""
    def ge(ds, v):
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.private_block(0x0019, "GEMS_ACQU_01", create=True).add_new(0x9C, "LO", "B0map")

    write_volumes(tmp_path, 2, edit=ge)
    volumes = find_volumes(tmp_path)
    assert [c.component for c in volumes] == ["field map", "magnitude"]
    assert volume_offset(load_volume(tmp_path), load_volume(tmp_path, volume=0)) == pytest.approx(100 * SLOPE)


@pytest.mark.parametrize(
    "image_type, component",
    [
        (("ORIGINAL", "PRIMARY", "M", "ND"), "magnitude"),  # Siemens
        (("ORIGINAL", "PRIMARY", "P", "ND"), "phase"),
        (("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"), "magnitude"),  # Philips classic
        (("ORIGINAL", "PRIMARY", "PHASE MAP", "P", "FFE"), "phase"),
        (("ORIGINAL", "PRIMARY", "B0 MAP", "B0", "UNSPECIFIED"), "field map"),
        (("ORIGINAL", "PRIMARY", "T1", "FIELD_MAP"), "field map"),  # enhanced FrameType
        (("ORIGINAL", "PRIMARY", "R_FFE", "R", "FFE"), "real"),
        (("ORIGINAL", "PRIMARY", "AXIAL"), None),  # CT: says nothing
        (("DERIVED", "PRIMARY", "MPR", "M"), "magnitude"),
        (("ORIGINAL", "PRIMARY", "MPR"), None),  # M as a prefix only counts with an underscore
    ],
)
def test_image_components_in_vendor_spellings(image_type, component):
    assert image_component(image_type) == component


def test_volume_picks_within_one_series_only(tmp_path):
    write_volumes(tmp_path / "a", 2)
    write_volumes(tmp_path / "b", 2)
    with pytest.raises(AmbiguousSeriesError, match=r"`volume` picks among the volumes of one series, but 2 series"):
        load_volume(tmp_path, volume=0)


@pytest.mark.parametrize("volume", [-1, 1.5, True, "0"])
def test_volume_must_be_a_non_negative_integer(volume):
    with pytest.raises(ValueError, match="`volume` must be a non-negative integer or None"):
        SeriesRules(volume=volume)


def test_identical_copies_of_an_instance_are_dropped(tmp_path):
    (paths,) = write_volumes(tmp_path / "series", 1)
    clean = load_volume(tmp_path / "series")
    shutil.copy(paths[2], tmp_path / "series" / "copy.dcm")  # byte for byte
    ds = pydicom.dcmread(paths[3])
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # the same instance, encoded otherwise
    ds.save_as(tmp_path / "series" / "re-encoded.dcm", enforce_file_format=True)
    volume = load_volume(tmp_path / "series")
    assert np.array_equal(volume.numpy(), clean.numpy())
    assert geometry_corrections(volume.meta) == [{"type": "duplicate_instances_dropped", "count": 2}]


def test_one_instance_twice_with_different_pixels_names_both_files(tmp_path):
    (paths,) = write_volumes(tmp_path, 1)
    ds = pydicom.dcmread(paths[2])
    stored = np.frombuffer(ds.PixelData, dtype=np.int16).copy()
    stored[0] += 1
    ds.PixelData = stored.tobytes()
    ds.save_as(tmp_path / "altered.dcm", enforce_file_format=True)
    with pytest.raises(DuplicateInstanceError, match="with different pixels") as info:
        load_volume(tmp_path)
    assert paths[2].name in str(info.value) and "altered.dcm" in str(info.value)
