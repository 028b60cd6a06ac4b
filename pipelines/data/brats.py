"""Manifests of a local BraTS download: the 2021 and 2023 folder layouts as they are distributed.

- BraTS 2023 (and 2024, glioma and the other sub-challenges): one folder per case and time point,
  ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``; labels 1 necrotic core,
  2 edema, 3 enhancing tumor. The last number is the time point: cases that differ only there are
  one patient, kept in one split by ``split_manifest``.
- BraTS 2021: ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz``; labels 1, 2 and 4
  (enhancing tumor); each case is its own patient.

A case's ``image`` is the list of its channel files in the order asked for (a subset and order of
:data:`BRATS_CHANNELS`, named as in BraTS 2023: native T1, contrast-enhanced T1, T2, FLAIR), its
``label`` the segmentation when present (validation data have none). ``convention`` names the
layout, so a bundle maps 2021's label 4 to 3 (not ``label_convention``: MONAI's ``Spacingd`` overwrites
every key that starts with ``label_`` as if it were the label's metadata). The files of a case must share one grid, as BraTS
distributes them co-registered; headers are read, not the voxels.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.data.manifest import _progress, image_hash, resolve_path
from pipelines.io.errors import InputDataError

__all__ = ["BRATS_CHANNELS", "LAYOUTS", "BratsLayout", "build_brats_manifest", "detect_layout"]

BRATS_CHANNELS = ("t1n", "t1c", "t2w", "t2f")
_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class BratsLayout:
    """One BraTS release's folder layout.

    Attributes:
        name: ``brats2023`` or ``brats2021``.
        case: regular expression a case folder's name matches.
        files: channel -> what follows the case id in its file name.
        label: what follows the case id in the segmentation's file name.
        label_values: necrotic core, edema, enhancing tumor in this release.
        patient: case id -> patient id.
    """

    name: str
    case: str
    files: dict[str, str]
    label: str
    label_values: tuple[int, int, int]
    patient: Callable[[str], str]


LAYOUTS = {
    "brats2023": BratsLayout("brats2023", r"^BraTS-[A-Z]+-\d{5}-\d{3}$",
                             {"t1n": "-t1n", "t1c": "-t1c", "t2w": "-t2w", "t2f": "-t2f"}, "-seg", (1, 2, 3),
                             lambda case_id: case_id.rsplit("-", 1)[0]),
    "brats2021": BratsLayout("brats2021", r"^BraTS20\d\d_\d{5}$",
                             {"t1n": "_t1", "t1c": "_t1ce", "t2w": "_t2", "t2f": "_flair"}, "_seg", (1, 2, 4),
                             lambda case_id: case_id),
}


def _case_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputDataError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_layout(folder: str | os.PathLike) -> BratsLayout:
    """The layout whose case folder names ``folder`` holds; an error naming the folder when none matches."""
    folder = Path(folder)
    names = [p.name for p in _case_folders(folder)]
    counts = {layout.name: sum(bool(re.match(layout.case, n)) for n in names) for layout in LAYOUTS.values()}
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        raise InputDataError(
            f"{folder}: no BraTS case folders (BraTS-GLI-00000-000 as in 2023, BraTS2021_00000 as in 2021) among "
            f"{len(names)} sub-folders"
        )
    return LAYOUTS[best]


def _file(case_dir: Path, stem: str) -> Path | None:
    for suffix in _SUFFIXES:
        if (case_dir / f"{stem}{suffix}").is_file():
            return case_dir / f"{stem}{suffix}"
    return None


def _grid(path: Path) -> tuple[tuple[int, ...], np.ndarray, tuple[float, ...]]:
    import nibabel as nib

    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises several kinds for a broken header
        raise InputDataError(f"{path}: not a readable NIfTI file: {exc}") from exc
    return tuple(int(s) for s in image.shape[:3]), np.asarray(image.affine), tuple(float(z) for z in image.header.get_zooms()[:3])


def _describe(case_dir: Path, layout: BratsLayout, channels: Sequence[str], root: Path) -> dict:
    """The manifest entry of one case folder; InputDataError naming the case and what is wrong."""
    case_id = case_dir.name
    files = []
    for channel in channels:
        stem = f"{case_id}{layout.files[channel]}"
        found = _file(case_dir, stem)
        if found is None:
            raise InputDataError(f"{case_dir}: no {channel} file ({stem}.nii.gz)")
        files.append(found)
    label = _file(case_dir, f"{case_id}{layout.label}")
    shape, affine, zooms = _grid(files[0])
    for other in files[1:] + ([label] if label else []):
        other_shape, other_affine, _ = _grid(other)
        if other_shape != shape or not np.allclose(other_affine, affine, atol=1e-3):
            raise InputDataError(
                f"{other}: grid {other_shape} differs from {files[0].name}'s {shape} (or its affine does); "
                f"BraTS files of one case share one grid"
            )
    entry = {
        "image": [os.path.relpath(f, root) for f in files],
        "case_id": case_id,
        "patient": layout.patient(case_id),
        "channels": list(channels),
        "convention": layout.name,
        "modality": "MR",
        "shape": list(shape),
        "spacing": [round(z, 6) for z in zooms],
        "sha256": image_hash(files),
    }
    if label is not None:
        entry["label"] = os.path.relpath(label, root)
    return entry


def build_brats_manifest(dataset_dir: str | os.PathLike, images: str = ".", channels: Sequence[str] = BRATS_CHANNELS,
                         layout: str | None = None, progress: bool = False) -> tuple[dict, list[str]]:
    """Describe every case folder of a BraTS download; returns ``(manifest, problems)``.

    Args:
        dataset_dir: the folder manifest paths are relative to.
        images: the sub-folder holding the case folders.
        channels: which channels make ``image``, in this order (a subset of :data:`BRATS_CHANNELS`).
        layout: ``brats2023`` or ``brats2021``; None to tell from the folder names.
        progress: show a progress bar.

    Returns:
        The manifest (every case under ``training``) and one line per case left out: a folder that
        is not a case of the layout, a missing channel, channels on different grids, a broken file.
    """

    channels = list(channels)
    unknown = [c for c in channels if c not in BRATS_CHANNELS]
    if not channels or unknown or len(set(channels)) != len(channels):
        raise ValueError(f"`channels` must be distinct names among {BRATS_CHANNELS}, got {channels}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {sorted(LAYOUTS)} or None, got {layout!r}")
    root = Path(dataset_dir)
    folder = resolve_path(root, images, "--images")
    chosen = LAYOUTS[layout] if layout is not None else detect_layout(folder)
    cases, problems = [], []
    for case_dir in _progress(_case_folders(folder), "scanning", progress):
        if not re.match(chosen.case, case_dir.name):
            problems.append(f"{case_dir}: not a {chosen.name} case folder name")
            continue
        try:
            cases.append(_describe(case_dir, chosen, channels, root))
        except (InputDataError, OSError) as exc:
            problems.append(str(exc))
    description = f"built from {images} ({chosen.name} layout, channels {', '.join(channels)}) by unet-pipelines"
    return {"description": description, "training": cases}, problems
