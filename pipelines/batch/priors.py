"""The prior study of the same patient: who a study is, kept as keyed hashes, and where its prior
lies among finished cases (comparing them: :mod:`pipelines.batch.comparison`).

A case from DICOM input is identified by its patient and study date, kept in the outputs only as
keyed hashes (HMAC-SHA-256 with the site's secret salt, :func:`site_salt`): ``record["study"]`` is
``{"patient", "study", "day"}`` where ``patient`` hashes the PatientID, ``study`` the PatientID with
the StudyInstanceUID, and ``day`` is the study date as a day number shifted by an offset that the
salt and the PatientID fix (within +-50 years): without the salt neither the ID nor the date can be
read back, yet two studies of one patient give their interval in days. Each such case also writes
``anatomy.nii.gz``, its reference image at about 2 mm (every n-th voxel), which a later study is
registered to.

The prior of a case is the latest earlier study of the same patient among the run's own finished
cases and those of the ``--prior`` output folders (:class:`PriorIndex`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch

from pipelines.batch.errors import BatchInputError
from pipelines.io.writers import save_nifti

__all__ = ["ANATOMY_FILE", "SALT_ENV", "PriorIndex", "PriorStudy", "latest_comparable", "prior_folders", "site_salt",
           "study_identity", "write_anatomy"]

logger = logging.getLogger(__name__)

SALT_ENV = "UNET_PIPELINES_SALT"
ANATOMY_FILE = "anatomy.nii.gz"
ANATOMY_MM = 2.0
_DAY_SHIFT = 36525  # the date's shift spans +-50 years


def site_salt() -> bytes:
    """The site's secret for the patient and study hashes: ``$UNET_PIPELINES_SALT``, or the file
    ``unet-pipelines/salt`` in ``$XDG_CONFIG_HOME`` (``~/.config``), created with a random value
    (readable by its owner only) on first use. Runs whose outputs are compared need the same salt."""
    value = os.environ.get(SALT_ENV)
    if value:
        return value.encode()
    folder = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "unet-pipelines"
    path = folder / "salt"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made by another process meanwhile
            pass
        else:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip().encode()


def _keyed(salt: bytes, *parts: str) -> str:
    return hmac.new(salt, "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()


def study_identity(identifiers: Mapping, study_uid: str, salt: bytes) -> dict | None:
    """``{"patient", "study", "day"}`` of a study (see the module docstring), or None without a
    PatientID or a valid StudyDate (``YYYYMMDD``)."""
    patient, when = str(identifiers.get("patient_id") or "").strip(), str(identifiers.get("study_date") or "").strip()
    try:
        day = date(int(when[:4]), int(when[4:6]), int(when[6:8])).toordinal() if len(when) == 8 else None
    except ValueError:
        day = None
    if not patient or day is None:
        return None
    shift = int(_keyed(salt, "day shift", patient)[:12], 16) % (2 * _DAY_SHIFT) - _DAY_SHIFT
    return {"patient": _keyed(salt, "patient", patient)[:32], "study": _keyed(salt, "study", patient, study_uid)[:32],
            "day": day + shift}


def write_anatomy(path: Path, image: np.ndarray, affine: np.ndarray):
    """``image`` ``(X, Y, Z)`` at about :data:`ANATOMY_MM` (every n-th voxel along each axis), int16
    when its values are whole numbers in range, else float32. Returns it as a later run reads it back
    (``(1, X, Y, Z)``, the affine at the file's float32 precision), so that a study is compared with
    its prior on equal terms without reading its own file again (a MONAI ``MetaTensor``)."""
    from monai.data import MetaTensor  # MONAI imports Ignite: see pipelines.batch.bundle

    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    step = np.maximum(1, np.floor(ANATOMY_MM / spacing + 0.25)).astype(int)
    image = np.asarray(image)[:: step[0], :: step[1], :: step[2]]
    strided = affine.copy()
    strided[:3, :3] = affine[:3, :3] * step
    whole = np.all(np.isfinite(image)) and np.array_equal(image, np.round(image)) and image.min(initial=0) >= -32768 \
        and image.max(initial=0) <= 32767
    dtype = np.int16 if whole else np.float32
    save_nifti(image, strided, path, dtype=dtype)
    stored = strided.astype(np.float32).astype(np.float64)  # NIfTI keeps the affine in float32
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(image.astype(dtype))[None]), affine=torch.as_tensor(stored))


@dataclass
class PriorStudy:
    """A finished study of a patient: its (shifted) day, output folder and what was kept of its record."""

    day: int
    case_dir: Path
    record: dict


@dataclass
class PriorIndex:
    """The finished studies a case may be compared with: those of ``folders`` (earlier output
    folders), read once, and the run's own ``output``, read again for cases finished since (another
    torchrun rank's), with the cases this process finishes added by :meth:`add`. With ``bundle``
    (a bundle's name), only studies segmented by that bundle: another bundle's labels are other
    quantities."""

    output: Path
    folders: Sequence[Path] = ()
    bundle: str | None = None
    _studies: dict[str, list[PriorStudy]] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)  # case folders as os.scandir names them: no Path per entry
    _patient_of: dict[Path, str] = field(default_factory=dict)
    _pending: set[Path] = field(default_factory=set)
    _listed: int | None = None
    _read_folders: bool = False

    def add(self, case_dir: Path, record: Mapping) -> None:
        """Take a finished case (its record replaces what was known of its folder)."""
        here = Path(case_dir)  # as the run names it: <folder>/<case id>, no resolving (one look per case)
        self._seen.add(os.fspath(here))
        known = self._patient_of.pop(here, None)
        if known is not None:
            self._studies[known] = [s for s in self._studies[known] if s.case_dir != here]
        study = record.get("study")
        same_bundle = self.bundle is None or (record.get("model") or {}).get("name") == self.bundle
        if record.get("status") == "ok" and study and same_bundle and ANATOMY_FILE in record.get("outputs", ()):
            kept = {key: record.get(key) for key in ("case_id", "study", "volumes_ml", "regions_ml", "finished", "input_hash")}
            kept["rano_sum_mm2"] = (record.get("rano") or {}).get("sum_mm2")
            kept["rano_non_enhancing_sum_mm2"] = ((record.get("rano") or {}).get("non_enhancing") or {}).get("sum_mm2")
            kept["lesion_uids"] = {int(lesion["lesion"]): lesion["tracking_uid"]
                                   for lesion in (record.get("comparison") or {}).get("lesions") or ()
                                   if lesion.get("tracking_uid")}
            self._studies.setdefault(study["patient"], []).append(PriorStudy(int(study["day"]), case_dir, kept))
            self._patient_of[here] = study["patient"]

    def _scan(self, folder: Path) -> None:
        try:
            new = [e.path for e in os.scandir(folder)
                   if e.path not in self._seen and not e.name.startswith(".") and e.is_dir()]
        except OSError as exc:
            logger.warning("prior studies: cannot read %s: %s", folder, exc.strerror or exc)
            return
        for case_dir in new:
            self._read(Path(case_dir))

    def _read(self, case_dir: Path) -> None:
        try:
            record = json.loads((case_dir / "record.json").read_text())
        except (OSError, ValueError):
            self._pending.add(case_dir)  # not finished (yet): looked at again
            return
        self._pending.discard(case_dir)
        self.add(case_dir, record)

    def _scan_output(self) -> None:
        """Cases of the run's folder finished since the last look (another rank's): the folder is
        listed again only when a case folder was made in it, else the unfinished ones are read again."""
        try:
            changed = os.stat(self.output).st_mtime_ns
        except OSError:
            return
        if changed != self._listed:
            self._listed = changed
            self._scan(self.output)
        else:
            for case_dir in list(self._pending):
                self._read(case_dir)

    def earlier(self, study: Mapping, case_dir: Path) -> list[PriorStudy]:
        """The finished studies of ``study``'s patient before its day, other than ``case_dir``'s, in time
        order (the run's folder looked at again first: see :meth:`_scan_output`)."""
        if not self._read_folders:
            for folder in self.folders:
                self._scan(Path(folder))
            self._read_folders = True
        self._scan_output()
        here = Path(case_dir)
        found = [s for s in self._studies.get(study["patient"], ()) if s.day < int(study["day"]) and s.case_dir != here]
        return sorted(found, key=_when)

    def prior(self, study: Mapping, case_dir: Path) -> tuple[Path, dict] | None:
        """:func:`latest_comparable` of :meth:`earlier`."""
        return latest_comparable(self.earlier(study, case_dir))


def _when(study: PriorStudy) -> tuple:
    return study.day, study.record.get("finished", "")


def latest_comparable(studies: Sequence[PriorStudy]) -> tuple[Path, dict] | None:
    """The latest of ``studies`` whose mask and anatomy are there to compare with, as ``(case folder,
    what was kept of its record)``; None without one."""
    comparable = [s for s in studies if all((s.case_dir / name).is_file() for name in (ANATOMY_FILE, "mask.nii.gz"))]
    if not comparable:
        return None
    latest = max(comparable, key=_when)
    return latest.case_dir, latest.record


def prior_folders(paths: Iterable) -> list[Path]:
    """``--prior`` folders, checked: each an output folder of an earlier run."""
    folders = []
    for path in paths:
        folder = Path(path)
        if not folder.is_dir():
            raise BatchInputError(f"--prior {folder}: not a folder (give the output folder of an earlier batch run)")
        if not any(folder.glob("*/record.json")):
            raise BatchInputError(f"--prior {folder}: no case records (*/record.json): not the output folder of a batch run")
        folders.append(folder)
    return folders
