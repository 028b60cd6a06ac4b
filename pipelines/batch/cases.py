"""The cases of a batch run: found in a folder tree, a manifest or a DICOMweb server.

A case is one study (a series chosen for each of the bundle's inputs by that input's rules) or one
image file, or, from a manifest, one entry. Case ids are pseudonymous (a hash of the
StudyInstanceUID or of the file's relative path; a manifest's own ``case_id``), so no patient name
or ID reaches a file name or a log line.

Nothing found is dropped without a record: a DICOM file that cannot be used fails the study its
header names; a file or folder that cannot be read at all fails the study whose files sit nearest
to it (the study that alone has files in the closest folder above it), or, with no study beside
it, becomes a failed case of its own, one per folder. A study where an input's rules find no series
or several, that holds one instance twice with different pixels, or whose DICOM files hold no image
volume at all (reports, screenshots), is a failed case.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pipelines.batch.errors import BatchInputError
from pipelines.batch.retry import RetryPolicy
from pipelines.batch.sources import (
    DicomSeriesSource,
    DicomWebSeriesSource,
    DicomWebStudy,
    DimseStudy,
    ImageFileSource,
    Source,
)
from pipelines.io.formats import is_image_file
from pipelines.io.rules import SeriesRules

__all__ = ["BatchInputError", "Case", "RemoteQuery", "discover_cases", "is_dicomweb_url", "is_remote", "pseudonym"]


@dataclass
class Case:
    """One unit of work.

    Attributes:
        case_id: pseudonymous id; the output folder's name.
        sources: per input key, where that input comes from; empty when ``error`` says why the case
            cannot be read (it is then recorded as failed without loading).
        path: the study folder, file or study URL the case came from (its record's ``source``).
        study_uid: the StudyInstanceUID, for studies.
        label: optional reference label file (from a manifest): the record then holds the Dice.
        error: why the case cannot be read, or None.
        warnings: what pydicom warned of while reading the case's files (they can name the files,
            so they go to the case's record, not to the log).
        identifiers: ``patient_id`` and ``study_date`` a manifest entry gives (its ``patient`` and
            ``study_date``), for image files, which carry none; DICOM headers' own take precedence.
        retry: how a remote study's fetch is tried again after a transient failure.
        retries: the retries made for the case, by step (``fetch``, ``push``), for its record.
    """

    case_id: str
    sources: dict[str, Source] = field(default_factory=dict)
    path: str = ""
    study_uid: str = ""
    label: str | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    identifiers: dict = field(default_factory=dict, repr=False)  # patient and date: never logged
    retry: RetryPolicy = field(default_factory=RetryPolicy, repr=False, compare=False)
    retries: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def kind(self) -> str:
        """``"error"``, or the sources' kind (``"dicom"``, ``"file"``, ``"dicomweb"``; ``"mixed"``)."""
        if self.error is not None:
            return "error"
        kinds = {source.kind for source in self.sources.values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def input_hash(self) -> str:
        """Identifies the inputs' content: a rerun with the same hash and model skips the case."""
        hashes = [f"{key}:{source.input_hash()}" for key, source in sorted(self.sources.items())]
        if len(hashes) == 1:
            return self.sources[next(iter(self.sources))].input_hash()
        return hashlib.sha256("\n".join(hashes).encode()).hexdigest()

    def load(self, rules: Mapping[str, SeriesRules], options: Mapping, cache_dir: Path) -> dict:
        """Each input, loaded: key -> ``(C, *spatial)`` MetaTensor. A remote study is fetched first,
        whole, again from the start after a transient failure (``retry``; counted in ``retries``).

        Raises:
            ValueError: the case cannot be read (``error``); the loaders' errors otherwise.
        """
        if self.error is not None:
            raise ValueError(self.error)
        studies = {id(s.study): s.study for s in self.sources.values() if isinstance(s, DicomWebSeriesSource)}
        for study in studies.values():
            self.retry.call(partial(study.fetch, cache_dir / self.case_id), "fetch", self.case_id, self.retries)
        return {key: source.load(rules[key], options, cache_dir / self.case_id) for key, source in self.sources.items()}

    def source(self) -> dict:
        """What ``record.json`` says about where the case came from."""
        if self.error is not None or not self.sources:
            out = {"kind": "error", "path": self.path}
            return {**out, "study_instance_uid": self.study_uid} if self.study_uid else out
        described = {key: source.describe() for key, source in self.sources.items()}
        if len(described) == 1:
            return next(iter(described.values()))
        out = {"kind": self.kind, "path": self.path, "inputs": described}
        return {**out, "study_instance_uid": self.study_uid} if self.study_uid else out


def pseudonym(key: str, prefix: str = "case") -> str:
    """``<prefix>-<12 hex digits>``: a stable id that does not reveal ``key``."""
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def is_dicomweb_url(source) -> bool:
    """Whether a batch input names a DICOMweb service (an http or https URL) rather than a path."""
    return str(source).startswith(("http://", "https://"))


def is_remote(source) -> bool:
    """Whether a batch input is a server: DICOMweb (``http(s)://``) or a DICOM peer (``dicom://``)."""
    from pipelines.batch.dimse import is_dimse_url

    return is_dicomweb_url(source) or is_dimse_url(source)


@dataclass(frozen=True)
class RemoteQuery:
    """Which studies of a server to take, and as whom: ``study_uids``, or a StudyDate in ``dates``
    (``YYYYMMDD`` or ``YYYYMMDD-YYYYMMDD``); ``calling_aet`` the AE title a DICOM peer sees."""

    study_uids: tuple[str, ...] = ()
    dates: str | None = None
    calling_aet: str = "UNETPIPELINES"

    def __post_init__(self) -> None:
        from pipelines.batch.dimse import check_ae_title

        try:
            check_ae_title(self.calling_aet, "--calling-aet")
        except ValueError as exc:
            raise BatchInputError(str(exc)) from exc
        if self.dates is not None and not re.fullmatch(r"\d{8}(-\d{8})?|\d{8}-|-\d{8}", self.dates):
            raise BatchInputError(f"--study-date must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD, got {self.dates!r}")
        bad = [uid for uid in self.study_uids if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) or len(uid) > 64]
        if bad:
            raise BatchInputError(f"--study-uid must be DICOM UIDs (digits and dots, at most 64), got {bad}")


def discover_cases(source: str | os.PathLike, inputs: Mapping[str, SeriesRules], section: str = "test",
                   dataset_dir: str | os.PathLike | None = None, image_key: str | None = None,
                   query: RemoteQuery | None = None, retry: RetryPolicy | None = None) -> list[Case]:
    """The cases under ``source``: a folder, a manifest (``.json``), a DICOMweb URL or a DICOM peer.

    ``section``, ``dataset_dir``, ``image_key``: manifest section, base folder (default: the manifest's) and,
    for a bundle of one input, the key of each entry's path (default: ``dicom`` when the entries have it,
    else ``image``); a bundle of several inputs finds each under its own key.

    Args:
        source: a folder tree of DICOM studies (any nesting, series mixed) and/or image files
            (NIfTI, NRRD, MHA, PNG, TIFF); a manifest file; an ``http(s)://`` DICOMweb service root;
            or a DICOM peer ``dicom://AET@host:port`` (C-FIND, then C-GET of each study).
        inputs: the bundle's input keys, each with its DICOM series rules (a study gives each input
            the series its rules choose; an image file is a case only for a bundle of one input).
        query: for a server, which studies (required for a DICOM peer) and the calling AE title.
        retry: for a server, how the query and each case's fetch are tried again after a transient
            failure (default: :class:`~pipelines.batch.retry.RetryPolicy`'s defaults).

    Returns:
        Cases sorted by id. Those that cannot be used come back with ``error`` set, so they are
        recorded as failed and the rest proceed.

    Raises:
        BatchInputError: nothing to do, or two inputs map to one case id.
    """
    inputs = {str(key): SeriesRules.of(rules) for key, rules in inputs.items()}
    if not inputs:
        raise ValueError("`inputs` must name at least one input key")
    if is_dicomweb_url(source):
        cases = _from_dicomweb(str(source), inputs, query or RemoteQuery(), retry or RetryPolicy())
    elif str(source).startswith("dicom://"):
        cases = _from_dimse(str(source), inputs, query or RemoteQuery(), retry or RetryPolicy())
    else:
        path = Path(source)
        if not path.exists():
            raise BatchInputError(f"{path}: no such file or folder")
        with _header_pool() as pool:
            if path.is_file() and path.suffix.lower() == ".json":
                cases = _from_manifest(path, section, dataset_dir, image_key, inputs, pool)
            elif path.is_dir():
                cases = _from_folder(path, inputs, pool)
            elif is_image_file(path):
                cases = [_file_case(path, path.parent, inputs)]
            else:
                cases = _from_folder(path, inputs, pool)  # a single DICOM file or a DICOMDIR
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
                f"two inputs map to case id {case.case_id}: {seen[case.case_id].path} and {case.path}; give them "
                f"distinct case ids (or remove the duplicate)"
            )
        seen[case.case_id] = case


def _file_case(path: Path, root: Path, inputs: Mapping, case_id: str | None = None, label: str | None = None) -> Case:
    case_id = case_id or pseudonym(os.path.relpath(path, root))
    if len(inputs) != 1:
        return Case(case_id=case_id, path=str(path), error=(
            f"{path}: an image file is one input, and this bundle reads {len(inputs)} ({', '.join(inputs)}): give "
            f"a manifest naming each input's file, or DICOM studies"))
    return Case(case_id=case_id, sources={next(iter(inputs)): ImageFileSource(str(path))}, path=str(path), label=label)


def _modalities(inputs: Mapping[str, SeriesRules]) -> set[str] | None:
    """The modalities every input's rules name, or None when one names none."""
    named = [rules.modality for rules in inputs.values()]
    if not all(named):
        return None
    return {m.upper() for wanted in named for m in ([wanted] if isinstance(wanted, str) else wanted)}


def _from_dicomweb(url: str, inputs: Mapping[str, SeriesRules], query: RemoteQuery, retry: RetryPolicy) -> list[Case]:
    """One case per study on the server with an image series (of the rules' modalities, when they
    all name some); each input's series is chosen by its rules once the study is fetched."""
    from pipelines.batch.dicomweb import discover_studies

    modalities = _modalities(inputs)
    try:
        found = retry.call(partial(discover_studies, url, modalities, query.study_uids, query.dates), "discovery")
    except ValueError as exc:
        raise BatchInputError(str(exc)) from exc
    cases = []
    for uid, listing_hash, _ in found:
        study = DicomWebStudy(url, uid, listing_hash, tuple(sorted(modalities)) if modalities else None)
        cases.append(Case(case_id=pseudonym(uid), sources={key: DicomWebSeriesSource(study) for key in inputs},
                          path=study.path, study_uid=uid, retry=retry))
    return cases


def _from_dimse(url: str, inputs: Mapping[str, SeriesRules], query: RemoteQuery, retry: RetryPolicy) -> list[Case]:
    """One case per study the DICOM peer finds (C-FIND) with an image series; each is fetched (C-GET)
    when its turn comes, and each input's series chosen by its rules."""
    from pipelines.batch.dimse import DimsePeer, find_studies

    try:
        peer = DimsePeer.parse(url)
        found = retry.call(partial(find_studies, peer, query.calling_aet, query.study_uids, query.dates,
                                   _modalities(inputs)), "discovery")
    except ValueError as exc:
        raise BatchInputError(str(exc)) from exc
    cases = []
    for uid, listing_hash, series in found:
        study = DimseStudy(str(peer), query.calling_aet, uid, listing_hash, tuple(series))
        cases.append(Case(case_id=pseudonym(uid), sources={key: DicomWebSeriesSource(study) for key in inputs},
                          path=study.path, study_uid=uid, retry=retry))
    return cases


def _from_folder(root: Path, inputs: Mapping[str, SeriesRules], pool: Executor | None = None) -> list[Case]:
    """Image files are cases; DICOM files are grouped by study, one case per study (headers read
    in ``pool`` when given)."""
    from pipelines.io.dicom import scan_dicom
    from pipelines.io.errors import InputDataError, NoImageDataError

    cases = []
    if root.is_dir():
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            cases.extend(_file_case(Path(folder) / name, root, inputs) for name in sorted(files)
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
    from pipelines.io.dicom import group_series, select_series
    from pipelines.io.errors import InputDataError

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


def _from_manifest(path: Path, section: str, dataset_dir, image_key: str | None, inputs: Mapping[str, SeriesRules],
                   pool: Executor | None = None) -> list[Case]:
    import json

    from pipelines.data import load_manifest

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
    from pipelines.data.manifest import resolve_path

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
    found = _from_folder(where, {key: inputs[key]}, pool)
    studies = [c for c in found if c.study_uid or c.error]
    if len(found) != 1 or not studies:
        return (f"{where}: manifest entry holds {len(studies)} studies and {len(found) - len(studies)} image files; "
                f"expected one study")
    study = found[0]
    if study.error is not None:
        return study.error
    case.sources[key] = study.sources[key]
    case.study_uid = case.study_uid or study.study_uid
    case.warnings = list(dict.fromkeys(case.warnings + study.warnings))
    return None
