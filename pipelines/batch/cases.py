"""The cases of a batch run: found in a folder tree, a manifest or a DICOMweb server.

A case is one study (its series chosen by the selection rules) or one image file. Case ids are
pseudonymous (a hash of the StudyInstanceUID or of the file's relative path; a manifest's own
``case_id``), so no patient name or ID reaches a file name or a log line.

Nothing found is dropped without a record: a DICOM file that cannot be used fails the study its
header names; a file or folder that cannot be read at all fails the study whose files sit nearest
to it (the study that alone has files in the closest folder above it), or, with no study beside
it, becomes a failed case of its own, one per folder. A study whose series the
rules cannot choose from, that holds one instance twice with different pixels, or whose DICOM files
hold no image volume at all (reports, screenshots), is a failed case.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.io.formats import is_image_file

__all__ = ["BatchInputError", "Case", "discover_cases", "is_dicomweb_url", "pseudonym"]



class BatchInputError(ValueError):
    """The run cannot start: its input or output is unusable as a whole (not one bad case)."""


@dataclass
class Case:
    """One unit of work.

    Attributes:
        case_id: pseudonymous id; the output folder's name.
        kind: ``"dicom"`` (``series`` holds the chosen series), ``"file"`` (``path`` is an image
            file), ``"dicomweb"`` (``study_uid`` on the server ``url``) or ``"error"`` (``error``
            says why it cannot be read; recorded as failed without loading).
        path: the source file or folder (study folder for DICOM).
        input_hash: identifies the input's content; a rerun with the same hash and model skips the case.
        label: optional reference label file (from a manifest): the record then holds the Dice.
        warnings: what pydicom warned of while reading the case's files (they can name the files,
            so they go to the case's record, not to the log).
    """

    case_id: str
    kind: str
    path: str = ""
    input_hash: str = ""
    series: object | None = None
    series_instance_uid: str = ""
    study_uid: str = ""
    url: str = ""
    label: str | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    def source(self) -> dict:
        """What ``record.json`` says about where the case came from."""
        out = {"kind": self.kind, "path": self.path}
        if self.series_instance_uid:
            out["series_instance_uid"] = self.series_instance_uid
        if self.study_uid:
            out["study_instance_uid"] = self.study_uid
        if self.url:
            out["url"] = self.url
        return out


def pseudonym(key: str, prefix: str = "case") -> str:
    """``<prefix>-<12 hex digits>``: a stable id that does not reveal ``key``."""
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _stat_hash(paths, extra: str = "") -> str:
    """Hash of the files' names, sizes and modification times: changes when a file is replaced."""
    digest = hashlib.sha256(extra.encode())
    for path in sorted(str(p) for p in paths):
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def is_dicomweb_url(source) -> bool:
    """Whether a batch input names a DICOMweb service (an http or https URL) rather than a path."""
    return str(source).startswith(("http://", "https://"))


def discover_cases(source: str | os.PathLike, rules: Mapping | None = None, section: str = "test",
                   dataset_dir: str | os.PathLike | None = None, image_key: str | None = None) -> list[Case]:
    """The cases under ``source``: a folder, a manifest (``.json``) or a DICOMweb URL.

    Args:
        source: a folder tree of DICOM studies (any nesting, series mixed) and/or image files
            (NIfTI, NRRD, MHA); a manifest file; or an ``http(s)://`` DICOMweb service root.
        rules: DICOM series selection rules (:class:`pipelines.io.dicom.SeriesRules` fields).
        section, dataset_dir, image_key: manifest section, base folder (default: the manifest's)
            and the key of each entry's image (default: ``dicom`` when the entries have it, else
            ``image``).

    Returns:
        Cases sorted by id. Studies that cannot be used (ambiguous series, unreadable files) come
        back as ``kind="error"`` cases, so they are recorded as failed and the rest proceed.

    Raises:
        BatchInputError: nothing to do, or two inputs map to one case id.
    """
    rules = dict(rules or {})
    if is_dicomweb_url(source):
        from pipelines.batch.dicomweb import discover_dicomweb

        cases = discover_dicomweb(str(source), rules)
    else:
        path = Path(source)
        if not path.exists():
            raise BatchInputError(f"{path}: no such file or folder")
        with _header_pool() as pool:
            if path.is_file() and path.suffix.lower() == ".json":
                cases = _from_manifest(path, section, dataset_dir, image_key, rules, pool)
            elif path.is_dir():
                cases = _from_folder(path, rules, pool)
            elif is_image_file(path):
                cases = [_file_case(path, path.parent)]
            else:
                cases = _from_folder(path, rules, pool)  # a single DICOM file or a DICOMDIR
    if not cases:
        raise BatchInputError(f"{source}: no studies or image files found")
    _check_unique(cases)
    return sorted(cases, key=lambda case: case.case_id)


@contextmanager
def _header_pool() -> Iterator[Executor | None]:
    """Processes that read DICOM headers beside this one, one per CPU (8 at most); started on first
    use, by fork, so they begin in milliseconds with this process's modules. None with one CPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cpus < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield None
        return
    with ProcessPoolExecutor(max_workers=min(cpus, 8), mp_context=multiprocessing.get_context("fork")) as pool:
        yield pool


def _check_unique(cases: list[Case]) -> None:
    seen: dict[str, Case] = {}
    for case in cases:
        if case.case_id in seen:
            raise BatchInputError(
                f"two inputs map to case id {case.case_id}: {seen[case.case_id].path or seen[case.case_id].study_uid} "
                f"and {case.path or case.study_uid}; give them distinct case ids (or remove the duplicate)"
            )
        seen[case.case_id] = case


def _file_case(path: Path, root: Path, case_id: str | None = None, label: str | None = None) -> Case:
    relative = os.path.relpath(path, root)
    return Case(
        case_id=case_id or pseudonym(relative),
        kind="file",
        path=str(path),
        input_hash=_stat_hash([path]),
        label=label,
    )


def _from_folder(root: Path, rules: Mapping, pool: Executor | None = None) -> list[Case]:
    """Image files are cases; DICOM files are grouped by study, one case per study (headers read
    in ``pool`` when given)."""
    from pipelines.io.dicom import scan_dicom
    from pipelines.io.errors import InputDataError, NoImageDataError

    cases = []
    if root.is_dir():
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            cases.extend(_file_case(Path(folder) / name, root) for name in sorted(files) if is_image_file(Path(name)))
    errors: list[InputDataError] = []
    try:
        scan = scan_dicom(root, errors=errors, pool=pool)
    except NoImageDataError as exc:
        scan = getattr(exc, "scan", None)
        if scan is None or not (errors or scan.skipped):
            return cases
    return cases + _study_cases(root, scan.records, errors, rules, scan.warnings, scan.skipped)


def _study_cases(root: Path, records: list, errors: list, rules: Mapping, warnings: Mapping | None = None,
                 skipped: Mapping | None = None) -> list[Case]:
    """One case per StudyInstanceUID; a study with an unreadable file or folder near it fails, and so
    does one whose DICOM files hold no volume slice (``skipped``: per study, ``(file, what)``)."""
    from pipelines.io.dicom import SeriesRules, group_series, select_series
    from pipelines.io.errors import InputDataError

    studies: dict[str, list] = defaultdict(list)
    for record in records:
        studies[record.study_instance_uid].append(record)
    broken, orphans = _assign_errors(root, studies, errors)
    cases = [
        Case(case_id=pseudonym(os.path.relpath(folder, root) if folder != root else "."), kind="error",
             path=str(folder), error="unreadable DICOM files, with no readable study beside them: " + "; ".join(found))
        for folder, found in sorted(orphans.items())
    ]
    selection = SeriesRules(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in rules.items()})
    warnings = dict(warnings or {})
    known = {str(r.path) for r in records}
    general = [w for path, found in warnings.items() if path not in known for w in found]  # e.g. the DICOMDIR's
    for uid in sorted((skipped or {}).keys() - studies.keys() - broken.keys()):  # nothing there to segment
        files = skipped[uid]
        kinds = sorted({what for _, what in files})
        cases.append(Case(case_id=pseudonym(uid), kind="error", path=os.path.commonpath([str(f.parent) for f, _ in files]),
                          study_uid=uid, warnings=list(general),
                          error=f"study holds no image volume: its {len(files)} DICOM file(s) are " + ", ".join(kinds)))
    for uid in broken.keys() - studies.keys():  # not one of its files could be read as a slice
        folders = [Path(getattr(e, "path", root)).parent for e in errors if getattr(e, "study_instance_uid", "") == uid]
        cases.append(Case(case_id=pseudonym(uid), kind="error", path=os.path.commonpath([str(f) for f in folders]),
                          study_uid=uid, warnings=list(general), error="study has unreadable DICOM files: "
                          + "; ".join(broken[uid])))
    for uid, study_records in studies.items():
        case_id = pseudonym(uid)
        folder = Path(os.path.commonpath([str(r.path.parent) for r in study_records]))
        caught = list(dict.fromkeys(general + _study_warnings(study_records, warnings)))
        if broken[uid]:
            cases.append(Case(case_id=case_id, kind="error", path=str(folder), study_uid=uid, warnings=caught,
                              error="study has unreadable DICOM files: " + "; ".join(broken[uid])))
            continue
        try:
            chosen = select_series(group_series(study_records), selection, f"study {case_id} ({folder})")
        except InputDataError as exc:
            cases.append(Case(case_id=case_id, kind="error", path=str(folder), study_uid=uid, error=str(exc),
                              warnings=caught))
            continue
        cases.append(Case(
            case_id=case_id,
            kind="dicom",
            path=str(folder),
            series=chosen,
            series_instance_uid=chosen.first.series_instance_uid,
            study_uid=uid,
            input_hash=_stat_hash({r.path for r in chosen.records}, extra=chosen.first.series_instance_uid),
            warnings=caught,
        ))
    return cases


def _assign_errors(root: Path, studies: Mapping[str, list], errors: list) -> tuple[dict, dict]:
    """Each error's study: walking up from the unreadable file or folder, the first folder that holds
    (at any depth) files of exactly one study. Errors with none, or with several studies, in their
    nearest folder that has any, are grouped by their own folder as ``orphans``."""
    under: dict[Path, set[str]] = defaultdict(set)
    for uid, study_records in studies.items():
        for folder in {r.path.parent for r in study_records}:
            for above in (folder, *folder.parents):
                under[above].add(uid)
                if above == root:
                    break
    broken: dict[str, list[str]] = defaultdict(list)
    orphans: dict[Path, list[str]] = defaultdict(list)
    for error in errors:
        path = Path(getattr(error, "path", root))
        if getattr(error, "study_instance_uid", ""):  # its header named its study
            broken[error.study_instance_uid].append(str(error))
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
    return broken, orphans


def _study_warnings(records: list, warnings: Mapping[str, list[str]]) -> list[str]:
    found = dict.fromkeys(w for path in dict.fromkeys(str(r.path) for r in records) for w in warnings.get(path, ()))
    return list(found)


def _from_manifest(path: Path, section: str, dataset_dir, image_key: str | None, rules: Mapping,
                   pool: Executor | None = None) -> list[Case]:
    import json

    from pipelines.data import load_manifest

    with open(path) as handle:
        raw = json.load(handle)
    entries = raw.get(section) if isinstance(raw, dict) else None
    if not entries:
        raise BatchInputError(f"{path}: manifest has no entries in section {section!r}")
    key = image_key or ("dicom" if all("dicom" in e for e in entries) else "image")
    base = Path(dataset_dir) if dataset_dir is not None else path.parent
    cases = []
    for entry in load_manifest(path, section, base, image_key=key):
        image = Path(entry["image"])
        label = entry.get("label")
        case_id = str(entry.get("case_id") or pseudonym(os.path.relpath(image, base)))
        if not image.exists():
            cases.append(Case(case_id=case_id, kind="error", path=str(image), error=f"{image}: no such file or folder"))
            continue
        if image.is_dir() or not is_image_file(image):
            found = _from_folder(image, rules, pool)
            studies = [c for c in found if c.kind in ("dicom", "error")]
            if len(found) != 1:
                cases.append(Case(case_id=case_id, kind="error", path=str(image),
                                  error=f"{image}: manifest entry holds {len(studies)} studies and "
                                        f"{len(found) - len(studies)} image files; expected one study"))
                continue
            case = found[0]
            case.case_id, case.label = case_id, label
            cases.append(case)
        else:
            cases.append(_file_case(image, base, case_id=case_id, label=label))
    return cases
