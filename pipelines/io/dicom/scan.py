"""Find DICOM image files under a path and read what grouping and geometry need from their headers.

Each file is parsed once with large values deferred, so pixel data stays on disk until a series is
chosen. Files that are not DICOM, and DICOM files that hold no image (DICOMDIR, structured reports,
segmentations...) or an image that is not a volume slice (a secondary capture without patient
geometry), are skipped and counted. Nothing that may be a slice of the series the caller wants is
skipped silently; each of these is an error naming the file:

- a DICOM file that cannot be parsed (truncated header, broken element), including one that is
  DICOM by its preamble or file meta information but cannot be read, and an empty ``.dcm`` file;
- an image whose IOD requires patient geometry (CT, MR, PET, classic or enhanced) without
  ImagePositionPatient or ImageOrientationPatient;
- pixel data shorter than its header promises (``Rows`` x ``Columns`` x frames);
- a folder that cannot be read.

Warnings that pydicom raises or logs while reading a file (they name the file) are collected per
file in :attr:`ScanResult.warnings` instead of being printed, so a caller can keep them with its case.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.fileset import FileSet
from pydicom.uid import UID

from pipelines.io.dicom.private import private_value
from pipelines.io.dicom.tiles import Tile, tile_layout
from pipelines.io.errors import CorruptFileError, InputNotFoundError, InputPermissionError, NoImageDataError
from pipelines.io.library_logs import library_logs_as_warnings

__all__ = ["PARALLEL_CHUNK", "PARALLEL_MIN_FILES", "ScanResult", "Skipped", "SliceRecord", "scan_dicom"]

logger = logging.getLogger(__name__)

PARALLEL_MIN_FILES = 32  # fewer headers are read in the calling process: a pool's round trip costs more
PARALLEL_CHUNK = 16

_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory (DICOMDIR)
_DEFER = 1024  # bytes: values larger than this (pixel data) are read only when used
_STUDY_INSTANCE_UID = 0x0020000D  # the last tag a broken file is read to, for its identity
# IODs whose Image Plane module (or Plane Position/Orientation functional groups) is mandatory:
# an image of these without patient geometry is broken, not a screenshot to skip
_GEOMETRY_REQUIRED = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
}
# objects with pixel data that are not images to segment: results (ours among them), dose grids
_NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
}
# file names that say "DICOM": such a file that is empty is a broken slice, not a stray file
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")


@dataclass(frozen=True)
class SliceRecord:
    """One 2D image: a single-frame file, or one frame of a multi-frame file (patient coordinates, LPS)."""

    path: Path
    frame: int | None
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_description: str
    series_number: int | None
    image_type: tuple[str, ...]
    rows: int
    columns: int
    orientation: tuple[float, ...]  # ImageOrientationPatient: row direction, column direction
    position: tuple[float, ...]  # ImagePositionPatient of the first pixel's centre
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    slope: float
    intercept: float
    instance_number: int | None
    acquisition_number: int | None
    temporal_position: int | None
    echo_number: float | None
    slice_thickness: float | None
    transfer_syntax: str
    identifiers: dict = field(compare=False, repr=False)  # patient/study identifiers: never logged
    echo_time: float | None = None  # ms; per frame in enhanced images
    manufacturer: str = ""
    sequence_name: str = ""  # GE's pulse sequence name (0019,109C): tells how some GE series store their volumes
    tile: Tile | None = None  # a slice stored as a tile of a MOSAIC or UIH grid frame (rows, columns: the tile's)
    # where the pixels of an uncompressed little-endian single-frame image start, their dtype, and the
    # allocated bits above BitsStored (ignored, as pydicom does): they are then read straight from
    # the file instead of parsing it a second time
    pixel_offset: int | None = field(default=None, compare=False, repr=False)
    pixel_dtype: str | None = field(default=None, compare=False, repr=False)
    pixel_unused_bits: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True)
class Skipped:
    """A DICOM file that holds no volume slice: which study it belongs to, and what it is."""

    study_instance_uid: str
    what: str


@dataclass
class ScanResult:
    """Attributes:
        records: every image slice found.
        skipped_non_dicom, skipped_non_image: files skipped, by reason.
        files: files looked at.
        warnings: per file path, the warnings pydicom raised while reading it.
        skipped: per StudyInstanceUID, the DICOM files of that study skipped as holding no volume
            slice, and what they are (a study of only these yields no volume: callers can say so).
    """

    records: list[SliceRecord]
    skipped_non_dicom: int = 0
    skipped_non_image: int = 0
    files: int = 0
    warnings: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, list[tuple[Path, str]]] = field(default_factory=dict)


def scan_dicom(path: str | os.PathLike, errors: list[CorruptFileError] | None = None,
               pool: Executor | None = None) -> ScanResult:
    """Image slices under ``path``: a DICOM file, a folder (any nesting) or a DICOMDIR.

    Args:
        path: what to scan.
        errors: when given, a DICOM file that cannot be read is appended here (a
            :class:`CorruptFileError` with its ``path`` attribute set, and ``study_instance_uid``
            when its header could be read) and the scan goes on; the batch job uses this to fail
            only the study that holds the file.
        pool: a process pool to read the headers in, :data:`PARALLEL_MIN_FILES` or more of them in
            chunks of :data:`PARALLEL_CHUNK` (reading a header is nearly all Python, so threads would
            not help). The result is the same as without it.

    Raises:
        NoImageDataError: no DICOM image is found; the message says what was skipped.
        CorruptFileError: a DICOM file cannot be parsed (truncated header, broken element), or an
            image lacks what it must have (see the module docstring).
        InputPermissionError: a file or folder cannot be read.
    """
    path = Path(path)
    result = ScanResult(records=[])
    folder_errors: list[InputPermissionError] = []
    files = list(_candidate_files(path, folder_errors, result.warnings))
    for error in folder_errors:
        if errors is None:
            raise error
        errors.append(error)
    if pool is not None and len(files) >= PARALLEL_MIN_FILES:
        outcomes = pool.map(_read_outcome, files, chunksize=PARALLEL_CHUNK)
    else:
        outcomes = map(_read_outcome, files)
    broken: list[Exception] = []
    for file, (outcome, caught) in zip(files, outcomes):
        result.files += 1
        if caught:
            result.warnings[str(file)] = caught
        if isinstance(outcome, InvalidDicomError):
            result.skipped_non_dicom += 1
        elif isinstance(outcome, Exception):
            outcome.path = file  # type: ignore[attr-defined]
            broken.append(outcome)
        elif outcome is None or isinstance(outcome, Skipped):
            result.skipped_non_image += 1
            if outcome is not None and outcome.study_instance_uid:
                result.skipped.setdefault(outcome.study_instance_uid, []).append((file, outcome.what))
        else:
            result.records.extend(outcome)
    broken = _without_superseded(broken, result)
    if broken and errors is None:
        raise broken[0]
    if errors is not None:
        errors.extend(broken)
    if not result.records:
        error = NoImageDataError(
            f"{path}: no DICOM image found ({result.files} files; {result.skipped_non_dicom} not DICOM, "
            f"{result.skipped_non_image} DICOM without an image)"
        )
        error.scan = result  # type: ignore[attr-defined]  # what was found all the same
        raise error
    if result.skipped_non_dicom or result.skipped_non_image:  # the path may name the patient: debug only
        logger.debug(
            "%s: skipped %d non-DICOM and %d non-image DICOM files",
            path,
            result.skipped_non_dicom,
            result.skipped_non_image,
        )
    return result


def _without_superseded(broken: list[Exception], result: ScanResult) -> list[Exception]:
    """``broken`` less the files whose instance (SOPInstanceUID, read before the break) has an intact
    copy among ``result.records`` (an export made twice, one copy cut short): each of those becomes
    a warning of the intact copy, which is read instead."""
    if not broken:
        return broken
    intact = {r.sop_instance_uid: r.path for r in result.records}
    kept = []
    for error in broken:
        copy = intact.get(getattr(error, "sop_instance_uid", ""))
        if copy is None:
            kept.append(error)
        else:
            result.warnings.setdefault(str(copy), []).append(
                f"broken copy left out, this intact one read instead: {error}")
    return kept


def _read_outcome(file: Path) -> tuple[list[SliceRecord] | Skipped | None | Exception, list[str]]:
    """:func:`_read_records` and the warnings it raised, with the errors the scan handles returned
    rather than raised (so they come back from a pool's worker in order with the rest)."""
    with warnings.catch_warnings(record=True) as caught, library_logs_as_warnings():
        warnings.simplefilter("always")
        try:
            outcome = _read_records(file)
        except (InvalidDicomError, CorruptFileError, NoImageDataError, InputPermissionError, InputNotFoundError) as exc:
            outcome = exc
    return outcome, _messages(caught)


def _messages(caught) -> list[str]:
    return list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))


def _read_records(file: Path) -> list[SliceRecord] | Skipped | None:
    try:
        ds = pydicom.dcmread(file, defer_size=_DEFER)
    except PermissionError as exc:
        raise InputPermissionError(f"{file}: not readable (permission denied)") from exc
    except FileNotFoundError as exc:  # listed by a DICOMDIR, or removed while the scan ran
        raise InputNotFoundError(f"{file}: missing (listed by a DICOMDIR, or removed during the scan)") from exc
    except InvalidDicomError as exc:
        _refuse_broken_dicom(file, exc)
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError) as exc:
        error = CorruptFileError(f"{file}: unreadable DICOM file ({type(exc).__name__}: {exc})")
        error.study_instance_uid, error.sop_instance_uid = _identity(file)  # type: ignore[attr-defined]
        raise error from exc
    try:
        return _records(file, ds)
    except (CorruptFileError, NoImageDataError) as exc:
        # the header was read: which study the broken file belongs to is known (callers group by it),
        # and which instance it holds (an intact copy elsewhere is read instead)
        # (pydicom returns an empty data set for some files cut short: read up to the break then)
        identity = (_text(ds, "StudyInstanceUID"), _text(ds, "SOPInstanceUID"))
        exc.study_instance_uid, exc.sop_instance_uid = identity if all(identity) else _identity(file)  # type: ignore[attr-defined]
        raise


def _identity(file: Path) -> tuple[str, str]:
    """StudyInstanceUID and SOPInstanceUID of a file that cannot be read whole, from the elements
    before the break (near its start; the SOPInstanceUID also from the file meta information);
    empty where they cannot be read either."""
    try:
        with open(file, "rb") as handle:
            ds = read_partial(handle, stop_when=lambda tag, vr, length: tag > _STUDY_INSTANCE_UID)
        meta = ds.get("file_meta") or {}
        return _text(ds, "StudyInstanceUID"), _text(ds, "SOPInstanceUID") or str(meta.get("MediaStorageSOPInstanceUID", ""))
    except Exception:  # noqa: BLE001 - a damaged file breaks pydicom in many ways: no identity then
        return "", ""


def _refuse_broken_dicom(file: Path, exc: InvalidDicomError) -> None:
    """A file pydicom calls "not DICOM" that is one all the same: empty with a DICOM name, or with the
    ``DICM`` marker or a file meta group at its start."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return
    if size == 0 and file.name.lower().endswith(_DICOM_SUFFIXES):
        raise CorruptFileError(f"{file}: empty file (0 bytes)") from exc
    if head[128:132] == b"DICM" or head[:2] == b"\x02\x00":
        raise CorruptFileError(f"{file}: unreadable DICOM file ({exc})") from exc


def _candidate_files(path: Path, folder_errors: list, caught: dict[str, list[str]]) -> Iterator[Path]:
    """Files under ``path``; folders that cannot be listed are appended to ``folder_errors`` and
    warnings from reading a DICOMDIR go to ``caught``."""
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name.upper() == "DICOMDIR":
            yield from _dicomdir_files(path, caught)
        else:
            yield path
        return

    def unreadable(exc: OSError) -> None:
        folder = exc.filename or path
        folder_errors.append(_folder_error(Path(folder), exc))

    for root, dirs, files in os.walk(path, onerror=unreadable):
        dirs.sort()
        for name in sorted(files):
            if name.upper() != "DICOMDIR":  # the directory itself; its files are in the walk
                yield Path(root) / name


def _folder_error(folder: Path, exc: OSError) -> InputPermissionError:
    error = InputPermissionError(f"{folder}: folder not readable ({exc.strerror or exc})")
    error.path = folder  # type: ignore[attr-defined]  # as scan errors carry it, for callers that map them to studies
    return error


def _dicomdir_files(path: Path, caught: dict[str, list[str]]) -> Iterator[Path]:
    """The files a DICOMDIR lists, including those that are missing (reading them then says so:
    pydicom leaves them out with a warning, which would lose slices without a word). pydicom's
    warnings go to ``caught`` under the file they name, else under the DICOMDIR."""
    with warnings.catch_warnings(record=True) as raised, library_logs_as_warnings():
        warnings.simplefilter("always")
        try:
            directory = pydicom.dcmread(path)
            instances = [Path(instance.path) for instance in FileSet(directory)]
        except Exception as exc:  # pydicom raises many types for a broken DICOMDIR
            raise CorruptFileError(f"{path}: unreadable DICOMDIR ({type(exc).__name__}: {exc})") from exc
    found = {str(p) for p in instances}
    for record in directory.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if file_id is None:
            continue
        listed = _referenced_file(path.parent, [file_id] if isinstance(file_id, str) else list(file_id))
        if str(listed) not in found:
            instances.append(listed)
            found.add(str(listed))
    for message in _messages(raised):  # one that ends with a listed file's path is that file's warning
        named = message.rsplit(": ", 1)[-1]
        caught.setdefault(named if named in found else str(path), []).append(message)
    yield from instances


def _referenced_file(root: Path, parts: list[str]) -> Path:
    """A DICOMDIR's file ID under ``root``, matching names without regard to case (media written on
    one system and copied to another often change it)."""
    target = root.joinpath(*parts)
    if target.exists():
        return target
    folder = root
    for part in parts:
        matches = [p for p in folder.iterdir() if p.name.upper() == part.upper()] if folder.is_dir() else []
        if not matches:
            return target
        folder = matches[0]
    return folder


def _records(file: Path, ds: pydicom.Dataset) -> list[SliceRecord] | Skipped | None:
    """The file's slices; :class:`Skipped` for DICOM that holds none; None for a DICOMDIR."""
    sop_class = UID(_text(ds, "SOPClassUID") or str(getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", "")))
    if sop_class == _DIRECTORY_SOP_CLASS:
        return None
    if not sop_class:  # every DICOM instance names its SOP class: this file is DICOM by its marker only
        raise CorruptFileError(f"{file}: unreadable DICOM file (no SOPClassUID; damaged or empty after its header)")
    if sop_class in _NOT_IMAGES:
        return Skipped(_text(ds, "StudyInstanceUID"), sop_class.name)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        if sop_class.name.endswith("Image Storage") or "ImagePositionPatient" in ds:
            # an image SOP class without pixels: stripped, or the file ends early (pydicom stops quietly)
            raise NoImageDataError(f"{file}: DICOM image header without pixel data ({sop_class.name}; truncated?)")
        return Skipped(_text(ds, "StudyInstanceUID"), sop_class.name)
    try:
        frames = int(_number(ds, "NumberOfFrames") or 1)
        common = _common(file, ds)
        _check_pixel_length(file, ds, common["rows"], common["columns"], frames)
        if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
            return [_enhanced_frame(file, ds, common, index) for index in range(frames)]
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient") if k not in ds]
        if "ImageOrientationPatient" in missing or "PixelSpacing" not in ds:
            return _without_geometry(file, ds, sop_class, missing)
        geometry = {
            "orientation": _floats(_numbers(ds, "ImageOrientationPatient"), 6, file, "ImageOrientationPatient"),
            "pixel_spacing": _spacing(ds, file),
            "slope": _number(ds, "RescaleSlope") or 1.0,
            "intercept": _number(ds, "RescaleIntercept") or 0.0,
        }
        tiles = tile_layout(file, ds, geometry["orientation"], geometry["pixel_spacing"], common["image_type"],
                            common["manufacturer"])
        if tiles is not None:
            return _tiled(file, ds, common, geometry, tiles, frames)
        if missing:
            return _without_geometry(file, ds, sop_class, missing)
        geometry["position"] = _floats(_numbers(ds, "ImagePositionPatient"), 3, file, "ImagePositionPatient")
        if frames == 1:
            return [SliceRecord(frame=None, **common, **geometry, **_raw_pixels(ds))]
        return _legacy_frames(file, ds, common, geometry, frames)
    except (NoImageDataError, CorruptFileError):
        raise
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise CorruptFileError(f"{file}: broken image geometry ({type(exc).__name__}: {exc})") from exc


def _without_geometry(file: Path, ds: pydicom.Dataset, sop_class: UID, missing: list[str]) -> Skipped:
    """An image without patient geometry: broken when its IOD requires it, else not a volume slice."""
    if sop_class in _GEOMETRY_REQUIRED:
        names = " or ".join(missing) or "PixelSpacing"
        raise CorruptFileError(f"{file}: {sop_class.name} without {names} (its IOD requires them)")
    return Skipped(_text(ds, "StudyInstanceUID"), f"{sop_class.name} without patient geometry")  # a screenshot


def _check_pixel_length(file: Path, ds: pydicom.Dataset, rows: int, columns: int, frames: int) -> None:
    """Uncompressed pixel data must hold what Rows x Columns x frames promise (a damaged header can
    promise gigabytes that are not there)."""
    if "PixelData" not in ds or UID(str(ds.file_meta.get("TransferSyntaxUID", ""))).is_compressed:
        return
    element = ds.get_item(0x7FE00010, **_KEEP_DEFERRED)
    length = getattr(element, "length", None)
    if length is None or length == 0xFFFFFFFF:
        return
    bits, samples = int(_raw(ds, "BitsAllocated") or 16), int(_raw(ds, "SamplesPerPixel") or 1)
    expected = (rows * columns * frames * samples * bits + 7) // 8
    if length < expected:
        raise CorruptFileError(
            f"{file}: pixel data holds {length} bytes, but Rows {rows} x Columns {columns} x {frames} frame(s) "
            f"x {samples} sample(s) x {bits} bits promise {expected}"
        )
    start = getattr(element, "value_tell", None)  # set when the value was deferred (left on disk)
    if start is not None and start + length > (size := file.stat().st_size):
        raise CorruptFileError(
            f"{file}: file ends after {max(size - start, 0)} of the {length} bytes of its pixel data (cut short, "
            f"e.g. by an interrupted transfer)"
        )


def _tiled(file: Path, ds, common: dict, geometry: dict, tiles: list[Tile], frames: int) -> list[SliceRecord]:
    """One record per tile of a MOSAIC or grid image; its pixels are cut from the decoded frame."""
    if frames != 1:
        raise CorruptFileError(f"{file}: tiled (MOSAIC or grid) image with {frames} frames; expected 1")
    fields = dict(common, **_raw_pixels(ds))  # the direct read covers the whole frame; tiles are cut from it
    return [
        SliceRecord(frame=None, **dict(fields, rows=t.rows, columns=t.columns), **geometry, position=t.position, tile=t)
        for t in tiles
    ]


_RAW_SYNTAXES = (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian)
_ASCII_VRS = ("AS", "CS", "DA", "DS", "IS", "SH", "TM", "UI")
# pydicom 3 hands back a deferred element unread; pydicom 2 (the MONAI Label environment) reads it
_KEEP_DEFERRED = {"keep_deferred": True} if int(pydicom.__version__.split(".")[0]) >= 3 else {}


def _raw(ds: pydicom.Dataset, keyword: str):
    """An element's value, read from its raw bytes where that is safe and cheap.

    pydicom converts elements lazily, with value validation, at a cost above that of reading the
    whole header; a volume's worth of slices pays it thousands of times. ASCII value
    representations (UIDs, code strings, dates, DS, IS) are returned as stripped text (multiple
    values joined by backslashes), 2-byte unsigned shorts as int; anything else (names, long strings
    with character sets, sequences) goes through pydicom.
    """
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    element = ds.get_item(tag, **_KEEP_DEFERRED)
    if isinstance(element, pydicom.dataelem.RawDataElement) and element.value is not None:
        vr = element.VR or pydicom.datadict.dictionary_VR(tag)
        if vr in _ASCII_VRS:
            return element.value.decode("ascii").strip(" \0")
        if vr == "US" and element.length == 2:
            return int.from_bytes(element.value, "little" if element.is_little_endian else "big")
    return ds[tag].value


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = _raw(ds, keyword)
    return "" if value is None else str(value)


def _numbers(ds: pydicom.Dataset, keyword: str) -> tuple[float, ...] | None:
    """Values of a numeric element (DS, IS, US...), or None when absent or empty."""
    value = _raw(ds, keyword)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return tuple(float(v) for v in value.split("\\"))
    return tuple(float(v) for v in (value if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]))


def _number(ds: pydicom.Dataset, keyword: str) -> float | None:
    values = _numbers(ds, keyword)
    return None if values is None else values[0]


def _raw_pixels(ds: pydicom.Dataset) -> dict:
    """Offset, dtype and unused high bits of pixel data that can be read directly: uncompressed
    little endian, one sample per pixel, 8, 16 or 32 bits allocated. As in PS3.5 8.1.1 and pydicom,
    the bits above BitsStored are ignored: masked off, or filled with the sign bit when signed
    (12 of 16 bits is common in CT and MR)."""
    try:
        if ds.file_meta.TransferSyntaxUID not in _RAW_SYNTAXES or int(_raw(ds, "SamplesPerPixel") or 1) != 1:
            return {}
        bits, stored = int(_raw(ds, "BitsAllocated")), int(_raw(ds, "BitsStored"))
        if bits not in (8, 16, 32) or not 0 < stored <= bits:
            return {}
        element = ds.get_item(0x7FE00010, **_KEEP_DEFERRED)
        offset = getattr(element, "value_tell", None)
        if offset is None or element.length < int(_raw(ds, "Rows")) * int(_raw(ds, "Columns")) * bits // 8:
            return {}
        kind = "i" if int(_raw(ds, "PixelRepresentation") or 0) == 1 else "u"
        return {"pixel_offset": int(offset), "pixel_dtype": f"<{kind}{bits // 8}", "pixel_unused_bits": bits - stored}
    except (AttributeError, TypeError, ValueError, KeyError):
        return {}


def _common(file: Path, ds: pydicom.Dataset) -> dict:
    def optional_int(keyword: str) -> int | None:
        value = _number(ds, keyword)
        return None if value is None else int(value)

    echo = _number(ds, "EchoNumbers")
    thickness = _number(ds, "SliceThickness")
    image_type = _text(ds, "ImageType")
    manufacturer = _text(ds, "Manufacturer")
    return {
        "path": file,
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "series_instance_uid": _text(ds, "SeriesInstanceUID"),
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "modality": _text(ds, "Modality"),
        "series_description": str(ds.get("SeriesDescription", "")),
        "series_number": optional_int("SeriesNumber"),
        "image_type": tuple(v.strip().upper() for v in image_type.split("\\")) if image_type else (),
        "rows": int(_raw(ds, "Rows")),
        "columns": int(_raw(ds, "Columns")),
        "instance_number": optional_int("InstanceNumber"),
        "acquisition_number": optional_int("AcquisitionNumber"),
        "temporal_position": optional_int("TemporalPositionIdentifier"),
        "echo_number": echo,
        "echo_time": _number(ds, "EchoTime"),
        "slice_thickness": thickness,
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "manufacturer": manufacturer,
        "sequence_name": _ge_sequence_name(ds) if manufacturer.upper().startswith("GE") else "",
        "identifiers": {
            "patient_id": str(ds.get("PatientID", "")),
            "patient_name": str(ds.get("PatientName", "")),
            "accession_number": _text(ds, "AccessionNumber"),
            "study_id": _text(ds, "StudyID"),
            "study_date": _text(ds, "StudyDate"),
        },
    }


def _ge_sequence_name(ds: pydicom.Dataset) -> str:
    """GE's pulse sequence name, private element (0019,109C) of the ``GEMS_ACQU_01`` block."""
    value = private_value(ds, 0x0019, "GEMS_ACQU_01", 0x9C)
    return "" if value is None else str(value).strip()


def _floats(value, count: int, file: Path, keyword: str) -> tuple[float, ...]:
    if value is None:
        raise CorruptFileError(f"{file}: {keyword} is empty")
    values = tuple(float(v) for v in value)
    if len(values) != count or not np.all(np.isfinite(values)):
        raise CorruptFileError(f"{file}: {keyword} must hold {count} finite numbers, got {list(value)!r}")
    return values


def _spacing(ds: pydicom.Dataset, file: Path) -> tuple[float, float]:
    values = _numbers(ds, "PixelSpacing")
    if values is None:
        raise CorruptFileError(f"{file}: image with patient geometry but no PixelSpacing")
    spacing = _floats(values, 2, file, "PixelSpacing")
    if min(spacing) <= 0:
        raise CorruptFileError(f"{file}: PixelSpacing must be positive, got {list(spacing)}")
    return spacing  # type: ignore[return-value]


def _legacy_frames(file: Path, ds, common: dict, geometry: dict, frames: int) -> list[SliceRecord]:
    """A multi-frame file without functional groups: frames stacked along the slice normal."""
    step = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    if not step:
        raise CorruptFileError(f"{file}: multi-frame image with one position and no SpacingBetweenSlices")
    row, col = np.array(geometry["orientation"][:3]), np.array(geometry["orientation"][3:])
    normal = np.cross(row, col)
    first = np.array(geometry["position"])
    records = []
    for index in range(frames):
        frame_geometry = dict(geometry, position=tuple(first + index * float(step) * normal))
        records.append(SliceRecord(frame=index, **common, **frame_geometry))
    return records


_FRAME_TYPE_SEQUENCES = ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence", "PETFrameTypeSequence")


def _enhanced_frame(file: Path, ds, common: dict, index: int) -> SliceRecord:
    """Per-frame geometry of an enhanced multi-frame image (functional groups, per frame or shared),
    with the frame's own FrameType (as its ImageType: magnitude and phase frames can share a file)
    and effective echo time."""
    if "PerFrameFunctionalGroupsSequence" in ds and len(ds.PerFrameFunctionalGroupsSequence) <= index:
        raise CorruptFileError(
            f"{file}: NumberOfFrames is {int(_number(ds, 'NumberOfFrames') or 1)} but only "
            f"{len(ds.PerFrameFunctionalGroupsSequence)} per-frame functional groups are present"
        )
    per_frame = ds.PerFrameFunctionalGroupsSequence[index] if "PerFrameFunctionalGroupsSequence" in ds else None
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None

    def group(sequence: str, keyword: str, default=None):
        for source in (per_frame, shared):
            if source is not None and sequence in source and keyword in source[sequence][0]:
                return source[sequence][0][keyword].value
        return default

    position = group("PlanePositionSequence", "ImagePositionPatient")
    orientation = group("PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = group("PixelMeasuresSequence", "PixelSpacing")
    if position is None or orientation is None or spacing is None:
        raise CorruptFileError(f"{file}: frame {index + 1} has no plane position, orientation or pixel spacing")
    thickness = group("PixelMeasuresSequence", "SliceThickness")
    content = per_frame.FrameContentSequence[0] if per_frame is not None and "FrameContentSequence" in per_frame else None
    temporal = content.get("TemporalPositionIndex") if content is not None else None
    frame_type = next((group(name, "FrameType") for name in _FRAME_TYPE_SEQUENCES if group(name, "FrameType")), None)
    echo_time = group("MREchoSequence", "EffectiveEchoTime")
    spacing_values = _floats(spacing, 2, file, "PixelSpacing")
    if min(spacing_values) <= 0:
        raise CorruptFileError(f"{file}: frame {index + 1} PixelSpacing must be positive, got {list(spacing)}")
    return SliceRecord(
        frame=index,
        orientation=_floats(orientation, 6, file, "ImageOrientationPatient"),
        position=_floats(position, 3, file, "ImagePositionPatient"),
        pixel_spacing=spacing_values,  # type: ignore[arg-type]
        slope=float(group("PixelValueTransformationSequence", "RescaleSlope", 1) or 1),
        intercept=float(group("PixelValueTransformationSequence", "RescaleIntercept", 0) or 0),
        **dict(
            common,
            temporal_position=None if temporal is None else int(temporal),
            slice_thickness=None if thickness is None else float(thickness),
            echo_time=float(echo_time) if echo_time is not None else common["echo_time"],
            image_type=tuple(str(v).strip().upper() for v in frame_type) if frame_type else common["image_type"],
        ),
    )
