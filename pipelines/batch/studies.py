"""Cases from files on disk: a folder tree of DICOM studies and image files, or a manifest's
entries (see :mod:`pipelines.batch.discovery` for what happens to what cannot be read)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import Executor
from pathlib import Path

from pipelines.batch.cases import Case, pseudonym
from pipelines.batch.errors import BatchInputError
from pipelines.batch.sources import DicomSeriesSource, ImageFileSource
from pipelines.data import load_manifest
from pipelines.data.manifest import resolve_path
from pipelines.io.dicom import group_series, scan_dicom, select_series
from pipelines.io.errors import InputDataError, NoImageDataError
from pipelines.io.formats import is_image_file
from pipelines.io.rules import SeriesRules

__all__ = ["file_case", "from_folder", "from_manifest"]


def file_case(path: Path, root: Path, inputs: Mapping, case_id: str | None = None, label: str | None = None) -> Case:
    case_id = case_id or pseudonym(os.path.relpath(path, root))
    if len(inputs) != 1:
        return Case(case_id=case_id, path=str(path), error=(
            f"{path}: an image file is one input, and this bundle reads {len(inputs)} ({', '.join(inputs)}): give "
            f"a manifest naming each input's file, or DICOM studies"))
    return Case(case_id=case_id, sources={next(iter(inputs)): ImageFileSource(str(path))}, path=str(path), label=label)


def from_folder(root: Path, inputs: Mapping[str, SeriesRules], pool: Executor | None = None) -> list[Case]:
    """Image files are cases; DICOM files are grouped by study, one case per study (headers read
    in ``pool`` when given)."""
    cases = []
    if root.is_dir():
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            cases.extend(file_case(Path(folder) / name, root, inputs) for name in sorted(files)
                         if is_image_file(Path(name)))
    errors: list[InputDataError] = []
    try:
        scan = scan_dicom(root, errors=errors, pool=pool)
    except NoImageDataError as exc:
        scan = getattr(exc, "scan", None)
        if scan is None or not (errors or scan.skipped):
            return cases
    return cases + _study_cases(root, scan.records, errors, inputs, scan.warnings, scan.skipped)


def _study_cases(root: Path, records: list, errors: list, inputs: Mapping[str, SeriesRules],
                 warnings: Mapping | None = None, skipped: Mapping | None = None) -> list[Case]:
    """One case per StudyInstanceUID; a study with an unreadable file or folder near it fails, and so
    does one whose DICOM files hold no volume slice (``skipped``: per study, ``(file, what)``)."""
    studies: dict[str, list] = defaultdict(list)
    for record in records:
        studies[record.study_instance_uid].append(record)
    broken, orphans, owners = _assign_errors(root, studies, errors)
    cases = [
        Case(case_id=pseudonym(os.path.relpath(folder, root) if folder != root else "."), path=str(folder),
             error="unreadable DICOM files, with no readable study beside them: " + "; ".join(found))
        for folder, found in sorted(orphans.items())
    ]
    warnings = dict(warnings or {})
    known = {str(r.path) for r in records}
    owned: dict[str, list[str]] = defaultdict(list)  # per study, those of its unreadable files
    general: list[str] = []  # of no one file, e.g. a DICOMDIR's
    for path, found in warnings.items():
        if path not in known:
            (owned[owners[path]] if path in owners else general).extend(found)
    for uid in sorted((skipped or {}).keys() - studies.keys() - broken.keys()):  # nothing there to segment
        files = skipped[uid]
        kinds = sorted({what for _, what in files})
        cases.append(Case(case_id=pseudonym(uid), path=os.path.commonpath([str(f.parent) for f, _ in files]),
                          study_uid=uid, warnings=list(general),
                          error=f"study holds no image volume: its {len(files)} DICOM file(s) are " + ", ".join(kinds)))
    for uid in broken.keys() - studies.keys():  # not one of its files could be read as a slice
        folders = [Path(getattr(e, "path", root)).parent for e in errors if getattr(e, "study_instance_uid", "") == uid]
        cases.append(Case(case_id=pseudonym(uid), path=os.path.commonpath([str(f) for f in folders]), study_uid=uid,
                          warnings=list(dict.fromkeys(general + owned[uid])),
                          error="study has unreadable DICOM files: " + "; ".join(broken[uid])))
    for uid, study_records in studies.items():
        folder = str(Path(os.path.commonpath([str(r.path.parent) for r in study_records])))
        case = Case(case_id=pseudonym(uid), path=folder, study_uid=uid,
                    warnings=list(dict.fromkeys(general + owned[uid] + _study_warnings(study_records, warnings))))
        if broken[uid]:
            case.error = "study has unreadable DICOM files: " + "; ".join(broken[uid])
        else:
            _choose_series(case, study_records, inputs)
        cases.append(case)
    return cases


def _choose_series(case: Case, records: list, inputs: Mapping[str, SeriesRules]) -> None:
    """Each input's series by its rules, into ``case.sources``; the first input that finds none or
    several fails the case, naming the input and its rules."""
    try:
        candidates = group_series(records)
    except InputDataError as exc:  # one instance twice with different pixels
        case.error = str(exc)
        return
    for key, rules in inputs.items():
        name = f"study {case.case_id} ({case.path})"
        if len(inputs) > 1:
            name += f", input {key!r} (rules {rules.as_dict()})"
        try:
            chosen = select_series(candidates, rules, name)
        except InputDataError as exc:
            case.error, case.sources = str(exc), {}
            return
        case.sources[key] = DicomSeriesSource(chosen, case.path)


def _assign_errors(root: Path, studies: Mapping[str, list], errors: list) -> tuple[dict, dict, dict[str, str]]:
    """Each error's study: the one its header names, else, walking up from the unreadable file or
    folder, the first folder that holds (at any depth) files of exactly one study. Errors with none,
    or with several studies in their nearest folder that has any, are grouped by their own folder
    as ``orphans``. Also returns the study of each unreadable path that has one."""
    under: dict[Path, set[str]] = defaultdict(set)
    for uid, study_records in studies.items():
        for folder in {r.path.parent for r in study_records}:
            for above in (folder, *folder.parents):
                under[above].add(uid)
                if above == root:
                    break
    broken: dict[str, list[str]] = defaultdict(list)
    orphans: dict[Path, list[str]] = defaultdict(list)
    owners: dict[str, str] = {}
    for error in errors:
        path = Path(getattr(error, "path", root))
        if getattr(error, "study_instance_uid", ""):  # its header named its study
            broken[error.study_instance_uid].append(str(error))
            owners[str(path)] = error.study_instance_uid
            continue
        owner = None
        for above in (path.parent, *path.parent.parents):
            if under.get(above):
                owner = next(iter(under[above])) if len(under[above]) == 1 else None
                break
            if above == root:
                break
        if owner is None:
            orphans[path.parent].append(str(error))
        else:
            broken[owner].append(str(error))
            owners[str(path)] = owner
    return broken, orphans, owners


def _study_warnings(records: list, warnings: Mapping[str, list[str]]) -> list[str]:
    found = dict.fromkeys(w for path in dict.fromkeys(str(r.path) for r in records) for w in warnings.get(path, ()))
    return list(found)


def from_manifest(path: Path, section: str, dataset_dir, image_key: str | None, inputs: Mapping[str, SeriesRules],
                   pool: Executor | None = None) -> list[Case]:
    with open(path) as handle:
        raw = json.load(handle)
    entries = raw.get(section) if isinstance(raw, dict) else None
    if not entries:
        raise BatchInputError(f"{path}: manifest has no entries in section {section!r}")
    single = len(inputs) == 1
    key = image_key or ("dicom" if all("dicom" in e for e in entries) else "image")
    base = Path(dataset_dir) if dataset_dir is not None else path.parent
    cases = []
    for index, entry in enumerate(load_manifest(path, section, base, image_key=key)):
        first = Path(entry["image"]) if single else None
        unnamed = pseudonym(os.path.relpath(first, base) if single else f"{section}/{index}")
        case_id = str(entry.get("case_id") or unnamed)
        identifiers = {name: str(entry[field]) for name, field in (("patient_id", "patient"), ("study_date", "study_date"))
                       if entry.get(field)}
        case = Case(case_id=case_id, path=str(first or path), label=entry.get("label"), identifiers=identifiers)
        try:
            paths = {next(iter(inputs)): first} if single else {
                k: _input_path(raw[section][index], k, key, base, path) for k in inputs}
        except KeyError as exc:
            case.error = (f"{path}: {section} entry {case_id} has no path for input {exc.args[0]!r} "
                          f"({', '.join(inputs)})")
            cases.append(case)
            continue
        for input_key, where in paths.items():
            error = _entry_source(case, input_key, Path(where), inputs, pool)
            if error is not None:
                case.error, case.sources = error, {}
                break
        cases.append(case)
    return cases


def _input_path(entry: Mapping, input_key: str, image_key: str, base: Path, manifest: Path) -> Path:
    """Where a manifest entry keeps one input of a bundle of several: under the input's own key; as
    the file of that channel in an ``image`` list with ``channels`` (BraTS layout); or in the study
    folder the entry's image key names, whose series the input's rules pick. KeyError otherwise."""
    image = entry.get(image_key)
    if input_key in entry:
        return resolve_path(base, entry[input_key], manifest)
    if isinstance(image, list) and input_key in (entry.get("channels") or []):
        return resolve_path(base, image[list(entry["channels"]).index(input_key)], manifest)
    if isinstance(image, str) and (where := resolve_path(base, image, manifest)).is_dir():
        return where
    raise KeyError(input_key)


def _entry_source(case: Case, key: str, where: Path, inputs: Mapping[str, SeriesRules],
                  pool: Executor | None) -> str | None:
    """Adds the source of one input of a manifest entry to ``case``; returns why it cannot, or None."""
    if not where.exists():
        return f"{where}: no such file or folder"
    if where.is_file() and is_image_file(where):
        case.sources[key] = ImageFileSource(str(where))
        return None
    found = from_folder(where, {key: inputs[key]}, pool)
    studies = [c for c in found if c.study_uid or c.error]
    if len(found) != 1 or not studies:
        return (f"{where}: manifest entry holds {len(studies)} studies and {len(found) - len(studies)} image files; "
                f"expected one study")
    study = found[0]
    if study.error is not None:
        return f"input {key!r}: {study.error}" if len(inputs) > 1 else study.error
    case.sources[key] = study.sources[key]
    case.study_uid = case.study_uid or study.study_uid
    case.warnings = list(dict.fromkeys(case.warnings + study.warnings))
    return None
