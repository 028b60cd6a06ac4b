"""The embedded demo data set: synthetic tumor cases as NIfTI files and as DICOM MR studies.

``write_demo_data(out_dir, manifest_path)`` writes, for every case,
``nifti/<case>_image.nii.gz``, ``nifti/<case>_label.nii.gz`` and ``dicom/<case>/`` (one MR study:
a multi-file axial series with the same stored values and geometry as the NIfTI image), and a
manifest (MONAI datalist: ``training``, ``validation``, ``test``) whose paths are relative to
``out_dir``. Each case's seed is ``seed + index``: the data set is the same on every machine.

It also writes one patient scanned twice, 91 days apart (``follow_up/`` and the manifest's
``follow_up`` section: the baseline study and the follow-up, where one lesion has grown and a new
one appeared; ``lesions`` names a map of the tumor's lesions, numbered 1 for the growing one and 2
for the new one), for the comparison with a prior study.
"""


from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pipelines.demo.synthetic import LABELS, load_template, make_case, make_follow_up
from pipelines.io.grid import LPS_TO_RAS

__all__ = ["DEFAULT_SPLIT", "FOLLOW_UP_DATES", "FOLLOW_UP_PATIENT", "staged_folder", "write_demo_data",
           "write_dicom_series", "write_follow_up"]

DEFAULT_SPLIT = {"training": 24, "validation": 8, "test": 8}
FOLLOW_UP_PATIENT = "DEMO-FU-001"
FOLLOW_UP_DATES = ("20260105", "20260406")  # 91 days apart
# the follow-up patient's seed (after ``seed``): one whose changes the shipped weights measure within
# 1 %; on other seeds their segmentation errs by up to about 12 % (benchmarks/follow_up_accuracy.py)
FOLLOW_UP_SEED = 1003


def _uid(*parts: object) -> str:
    """A UID derived from ``parts``: the same inputs give the same UID on every run."""
    return generate_uid(entropy_srcs=["unet-pipelines demo", *map(str, parts)])


def write_dicom_series(
    stored: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    patient_id: str,
    study_key: str,
    series_description: str = "T1 3D synthetic",
    series_key: str | None = None,
    series_number: int = 3,
    attributes: Mapping[str, object] | None = None,
) -> list[Path]:
    """Write an unsigned 12-bit volume ``(X, Y, Z)`` with RAS ``affine`` as one MR series, a file per
    ``Z`` slice.

    An axial grid (axis 0 to the patient's left or right, axis 1 to anterior or posterior, axis 2
    along the body axis) is flipped in each slice as needed so the files carry the usual axial
    ImageOrientationPatient ``1\\0\\0\\0\\1\\0``; any other grid with orthogonal axes (sagittal,
    coronal, oblique) is written as it lies: rows along axis 0, columns along axis 1. UIDs derive from ``study_key``
    (the study and its frame of reference) and ``series_key`` (the series of a study with several).
    ``attributes`` set or replace DICOM attributes of every file (``ImageType``, ``EchoTime``, ...).

    Returns:
        The files, one per slice, ``IM00001.dcm`` upwards.
    """
    stored = np.asarray(stored)
    if stored.ndim != 3 or stored.min() < 0 or stored.max() > 4095:
        raise ValueError(f"stored must be a 3D array of 12-bit values, got shape {stored.shape}")
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)  # its own inverse: RAS to LPS
    if np.allclose(lps[:3, :3], np.diag(np.diag(lps[:3, :3]))):  # axial
        # flip axes 0 and 1 where they run against LPS, so rows run left and columns posterior
        for axis in (0, 1):
            if lps[axis, axis] < 0:
                stored = np.flip(stored, axis)
                flip = np.eye(4)
                flip[axis, axis], flip[axis, 3] = -1.0, stored.shape[axis] - 1
                lps = lps @ flip
        if lps[2, 2] <= 0:
            raise ValueError("an axial affine's axis 2 must point towards the head")
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    directions = lps[:3, :3] / spacing
    if not np.allclose(directions.T @ directions, np.eye(3), atol=1e-6):
        raise ValueError(f"affine's axes must be orthogonal (a grid a scanner acquires), got\n{np.asarray(affine)}")
    normal = np.cross(directions[:, 0], directions[:, 1])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series = () if series_key is None else (series_key,)
    study_uid, series_uid = _uid(study_key, "study"), _uid(study_key, *series, "series")
    frame_uid = _uid(study_key, "frame")
    paths = []
    for k in range(stored.shape[2]):
        position = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
        sop_uid = _uid(study_key, *series, "slice", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "080000"
        ds.AccessionNumber = f"ACC{study_key[-6:]}"
        ds.Modality = "MR"
        ds.Manufacturer = "unet-pipelines synthetic (MNI152 2009c anatomy)"
        ds.InstitutionName = "unet-pipelines demo"
        ds.StudyDescription = "MR brain, synthetic tumor demo"
        ds.SeriesDescription = series_description
        ds.PatientName = f"Demo^{patient_id}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "HEAD"
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "GR", "SP", "3D"
        ds.SliceThickness = f"{spacing[2]:.6g}"
        ds.SpacingBetweenSlices = f"{spacing[2]:.6g}"
        ds.RepetitionTime, ds.EchoTime, ds.MagneticFieldStrength = "2300", "2.98", "3"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = "1", series_number, 1, k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v + 0.0:.6g}" for v in directions[:, :2].T.ravel()]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.SliceLocation = f"{position @ normal + 0.0:.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
        ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[0]:.6g}"]  # between rows, between columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = "1200", "2400"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T, dtype="<u2").tobytes()
        for keyword, value in (attributes or {}).items():
            setattr(ds, keyword, value)
        path = folder / f"IM{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@contextmanager
def staged_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` that replaces ``out_dir`` when the block succeeds and is
    removed when it fails: an interrupted run leaves the previous data set intact."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_demo_data(
    out_dir: str | os.PathLike,
    manifest_path: str | os.PathLike | None = None,
    split: dict[str, int] | None = None,
    seed: int = 0,
    dicom: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write the demo data set to ``out_dir`` (replacing it) and its manifest; returns the manifest.

    The data are written to a temporary folder beside ``out_dir`` and renamed into place, so an
    interrupted run leaves the previous data set intact.

    Args:
        out_dir: the data set folder (``demo_data``).
        manifest_path: where to write the manifest; None writes none.
        split: number of cases per section; default 24 training, 8 validation, 8 test.
        seed: case ``i`` (counted over the sections in order) uses seed ``seed + i``.
        dicom: also write every case as a DICOM study.
        progress: called with a line per case.
    """
    from pipelines.data import write_manifest
    from pipelines.io.hashing import content_hash
    from pipelines.io.writers import save_nifti

    split = dict(DEFAULT_SPLIT if split is None else split)
    template = load_template()
    manifest: dict = {
        "description": (
            "Synthetic brain-tumor MR cases written by `make demo-data` (pipelines.demo): MNI152 2009c "
            "anatomy from nilearn, deformed, with inserted lesions. Labels: "
            + ", ".join(f"{v} {k}" for k, v in LABELS.items())
            + ". Paths are relative to demo_data/; `dicom` is the same case as a DICOM MR study."
        )
    }
    with staged_folder(out_dir) as staging:
        index = 0
        for section, count in split.items():
            manifest[section] = []
            for _ in range(count):
                case_id = f"case_{index:03d}"
                case = make_case(template, seed + index)
                stored = np.rint(case.image).astype(np.uint16)
                image_path = staging / "nifti" / f"{case_id}_image.nii.gz"
                label_path = staging / "nifti" / f"{case_id}_label.nii.gz"
                save_nifti(stored, case.affine, image_path, dtype=np.int16)
                save_nifti(case.label, case.affine, label_path)
                entry = {
                    "image": f"nifti/{image_path.name}",
                    "label": f"nifti/{label_path.name}",
                    "case_id": case_id,
                    "patient": f"DEMO-{seed + index:03d}",
                    "modality": "MR",
                    "shape": [int(s) for s in stored.shape],
                    "spacing": [round(float(s), 6) for s in np.abs(np.diag(case.affine))[:3]],
                    "sha256": content_hash(image_path),
                }
                if dicom:
                    study = staging / "dicom" / case_id
                    write_dicom_series(stored, case.affine, study, entry["patient"], f"{seed}-{case_id}")
                    entry["dicom"] = f"dicom/{case_id}"
                manifest[section].append(entry)
                if progress is not None:
                    progress(f"{section} {case_id}: {stored.shape}, {case.lesions} lesion(s)")
                index += 1
        manifest["follow_up"] = write_follow_up(staging, template, seed + FOLLOW_UP_SEED, dicom=dicom)
    if manifest_path is not None:
        write_manifest(manifest, manifest_path)
    return manifest



def write_follow_up(out_dir: Path, template, seed: int, dicom: bool = True) -> list[dict]:
    """The patient of :func:`~pipelines.demo.synthetic.make_follow_up` under ``out_dir/follow_up``:
    per study its image, label and numbered lesions as NIfTI and its DICOM study (one PatientID,
    StudyDates :data:`FOLLOW_UP_DATES`); returns the manifest entries (paths relative to ``out_dir``)."""
    from pipelines.io.hashing import content_hash
    from pipelines.io.writers import save_nifti

    pair = make_follow_up(template, seed)
    folder = out_dir / "follow_up"
    entries = []
    for name, case, lesions, date in zip(("baseline", "follow_up"), (pair.baseline, pair.follow_up),
                                         pair.lesion_labels, FOLLOW_UP_DATES):
        case_id = f"fu_{name}"
        stored = np.rint(case.image).astype(np.uint16)
        paths = {kind: folder / "nifti" / f"{case_id}_{kind}.nii.gz" for kind in ("image", "label", "lesions")}
        save_nifti(stored, case.affine, paths["image"], dtype=np.int16)
        save_nifti(case.label, case.affine, paths["label"])
        save_nifti(lesions, case.affine, paths["lesions"])
        entry = {kind: str(path.relative_to(out_dir)) for kind, path in paths.items()}
        entry.update({"case_id": case_id, "patient": FOLLOW_UP_PATIENT, "study_date": date, "modality": "MR",
                      "shape": [int(v) for v in stored.shape], "sha256": content_hash(paths["image"])})
        if dicom:
            study = folder / "dicom" / case_id
            write_dicom_series(stored, case.affine, study, FOLLOW_UP_PATIENT, f"{seed}-{case_id}",
                               attributes={"StudyDate": date, "SeriesDate": date, "ContentDate": date})
            entry["dicom"] = str(study.relative_to(out_dir))
        entries.append(entry)
    return entries
