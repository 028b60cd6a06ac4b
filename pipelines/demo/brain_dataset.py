"""The multi-parametric brain tumor demo data set: each case as a DICOM MR study and in BraTS layout.

``write_brain_demo(out_dir, manifest_path)`` writes, for every case ``BraTS-DEMO-NNNNN-000``:

- ``dicom/<case>/NN_<series>/IM*.dcm``: one MR study of six series as a scanner exports them: a
  localizer, T1 3D axial at 1 mm, T1c 3D sagittal at 0.9 x 0.9 x 1 mm, T2 and FLAIR 2D axial at
  0.7 x 0.7 x 4 mm, and a diffusion trace series, named in one of three vendors' habits (:data:`SERIES_DESCRIPTIONS`); in some
  studies the patient moved between series; one study has no T1c;
- ``brats/<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``: the four channels and the label on the T1
  grid, co-registered, as BraTS distributes its cases (labels 1 NCR, 2 ED, 3 ET);

and a manifest whose ``image`` is the list of channel files (``channels`` order), ``study`` the
DICOM study folder (six series: a bundle's series rules pick its channels), with ``tumors``,
``moved`` and ``dicom_missing`` describing the case, and for a moved case ``movements``: per series,
the RAS matrix (mm) mapping a point of the T1 series to where that anatomy lies in the series, the
matrix a registration to the T1 should find. :data:`DEMO_SERIES_RULES`
find each channel in these studies. Cases are written by a process pool, each from its own seed,
into a staging folder renamed into place: the data set is the same on every machine, and an
interrupted run leaves the previous one intact.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pipelines.demo.brain import CHANNELS, make_brain_case
from pipelines.demo.dataset import staged_folder, write_dicom_series

__all__ = ["DEFAULT_BRAIN_SPLIT", "DEMO_SERIES_RULES", "SERIES_DESCRIPTIONS", "SERIES_NUMBERS", "write_brain_demo"]

DEFAULT_BRAIN_SPLIT = {"training": 16, "validation": 3, "test": 3}

# series numbers in the order a protocol runs them: contrast agent last
SERIES_NUMBERS = {"localizer": 1, "t1n": 2, "t2w": 3, "t2f": 4, "dwi": 5, "t1c": 6}

# how three scanner vendors' protocols name the series; a study takes one column
SERIES_DESCRIPTIONS = {
    "localizer": ("localizer", "3-Plane Loc", "SURVEY"),
    "t1n": ("t1_mprage_tra_p2_iso", "AX T1 3D BRAVO", "T1W_3D_TFE"),
    "t1c": ("t1_mprage_sag_p2_iso_POST", "SAG T1 3D BRAVO +C", "T1W_3D_TFE_SAG_GD"),
    "t2w": ("t2_tse_tra_p2", "AX T2 FSE", "T2W_TSE_TRA"),
    "t2f": ("t2_tirm_tra_dark-fluid", "AX T2 FLAIR", "T2W_FLAIR_TRA"),
    "dwi": ("ep2d_diff_tra_TRACEW", "AX DWI b1000", "DWI_TRA"),
}

# SeriesRules fields that find each channel in these studies (and in real ones named alike)
DEMO_SERIES_RULES = {
    "t1n": {"description": r"(?i)^(?!.*(\+c|post|gd|gad|contrast)).*t1", "min_slices": 20},
    "t1c": {"description": r"(?i)t1.*(\+c|post|gd|gad|contrast)", "min_slices": 20},
    "t2w": {"description": r"(?i)^(?!.*(flair|tirm|dark.?fluid)).*t2", "min_slices": 20},
    "t2f": {"description": r"(?i)(flair|tirm|dark.?fluid)", "min_slices": 20},
}

_ATTRIBUTES = {  # what each series' files say about its acquisition
    "localizer": {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"], "MRAcquisitionType": "2D",
                  "ScanningSequence": "GR", "RepetitionTime": "8.6", "EchoTime": "4"},
    "t1n": {"MRAcquisitionType": "3D", "ScanningSequence": "GR\\IR", "RepetitionTime": "2300", "EchoTime": "2.98",
            "InversionTime": "900"},
    "t1c": {"MRAcquisitionType": "3D", "ScanningSequence": "GR\\IR", "RepetitionTime": "2300", "EchoTime": "2.98",
            "InversionTime": "900", "ContrastBolusAgent": "Gadobutrol 0.1 mmol/kg"},
    "t2w": {"MRAcquisitionType": "2D", "ScanningSequence": "SE", "RepetitionTime": "5000", "EchoTime": "96"},
    "t2f": {"MRAcquisitionType": "2D", "ScanningSequence": "SE\\IR", "RepetitionTime": "9000", "EchoTime": "81",
            "InversionTime": "2500"},
    "dwi": {"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND"], "MRAcquisitionType": "2D",
            "ScanningSequence": "EP", "RepetitionTime": "6400", "EchoTime": "89"},
}


def _case_kind(index: int, count: int) -> dict:
    """What case ``index`` of ``count`` shows: two tumors, a small enhancing lesion only (the third
    from last, and every seventh from the fourth so training sees some), a patient who moved, a study
    without T1c (the last)."""
    return {
        "tumors": 2 if index % 4 == 1 else 1,
        "small": index == count - 3 or index % 7 == 3,
        "moved": index % 3 == 2,
        "missing": ("t1c",) if index == count - 1 else (),
    }


def _write_case(task: tuple) -> dict:
    """Render and write one case into ``staging``; returns its manifest entry."""
    from pipelines.data.manifest import image_hash
    from pipelines.demo.synthetic import load_template
    from pipelines.io.writers import save_nifti

    staging, index, count, seed = task
    kind = _case_kind(index, count)
    case = make_brain_case(load_template(), seed + index, kind["tumors"], kind["small"], kind["moved"])
    case_id = f"BraTS-DEMO-{index:05d}-000"
    brats = Path(staging) / "brats" / case_id
    files = []
    for channel in CHANNELS:
        path = brats / f"{case_id}-{channel}.nii.gz"
        save_nifti(np.rint(case.channels[channel]).astype(np.int16), case.affine, path, dtype=np.int16)
        files.append(path)
    save_nifti(case.label, case.affine, brats / f"{case_id}-seg.nii.gz")
    vendor = index % 3
    study = Path(staging) / "dicom" / case_id
    for series, acquisition in case.acquisitions.items():
        if series in kind["missing"]:
            continue
        number = SERIES_NUMBERS[series]
        write_dicom_series(np.rint(acquisition.image).astype(np.uint16), acquisition.affine,
                           study / f"{number:02d}_{series}", f"DEMO-BRAIN-{index:05d}", f"brain-{seed}-{case_id}",
                           SERIES_DESCRIPTIONS[series][vendor], series_key=series, series_number=number,
                           attributes=_ATTRIBUTES[series])
    entry = {
        "image": [os.path.relpath(f, staging) for f in files],
        "label": f"brats/{case_id}/{case_id}-seg.nii.gz",
        "case_id": case_id,
        "patient": case_id.rsplit("-", 1)[0],
        "channels": list(CHANNELS),
        "convention": "brats2023",
        "modality": "MR",
        "shape": [int(s) for s in case.label.shape],
        "spacing": [round(float(s), 6) for s in np.abs(np.diag(case.affine))[:3]],
        "sha256": image_hash(files),
        "study": f"dicom/{case_id}",
        "tumors": kind["tumors"],
        "moved": kind["moved"],
    }
    if kind["missing"]:
        entry["dicom_missing"] = list(kind["missing"])
    if kind["moved"]:  # the truth a registration is checked against
        entry["movements"] = {series: np.round(case.acquisitions[series].movement, 6).tolist()
                              for series in CHANNELS[1:] if series not in kind["missing"]}
    return entry


def write_brain_demo(out_dir: str | os.PathLike, manifest_path: str | os.PathLike | None = None,
                     split: dict[str, int] | None = None, seed: int = 1000, workers: int | None = None,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Write the brain tumor demo data set to ``out_dir`` (replacing it) and its manifest; returns it.

    Args:
        out_dir: the data set folder (``demo_brain``).
        manifest_path: where to write the manifest; None writes none.
        split: cases per section; default :data:`DEFAULT_BRAIN_SPLIT` (16 training, 3 validation, 3 test).
        seed: case ``i`` (counted over the sections in order) uses seed ``seed + i``.
        workers: processes rendering cases (default: one per CPU, at most 4).
        progress: called with a line per case.
    """
    from pipelines.data import write_manifest

    split = dict(DEFAULT_BRAIN_SPLIT if split is None else split)
    if any(not isinstance(n, int) or n < 0 for n in split.values()) or sum(split.values()) < 3:
        raise ValueError(f"`split` must give whole numbers >= 0 of cases, at least 3 in all, got {split}")
    count = sum(split.values())
    manifest: dict = {"description": (
        "Synthetic multi-parametric brain tumor MR studies written by `make demo-brain` (pipelines.demo.brain): "
        "MNI152 2009c anatomy from nilearn, four sequences on their own grids, BraTS 2023 labels (1 NCR, 2 ED, "
        "3 ET). `image` lists the channels t1n, t1c, t2w, t2f in BraTS layout; `study` is the case as one MR study.")}
    with staged_folder(out_dir) as staging:
        tasks = [(str(staging), i, count, seed) for i in range(count)]
        with ProcessPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
            entries = list(pool.map(_write_case, tasks))
    for section, n in split.items():
        manifest[section], entries = entries[:n], entries[n:]
        for entry in manifest[section] if progress is not None else ():
            progress(f"{section} {entry['case_id']}: {entry['shape']}, {entry['tumors']} tumor(s)"
                     + (", moved" if entry["moved"] else "")
                     + (f", no {', '.join(entry['dicom_missing'])} series" if "dicom_missing" in entry else ""))
    if manifest_path is not None:
        write_manifest(manifest, manifest_path)
    return manifest
