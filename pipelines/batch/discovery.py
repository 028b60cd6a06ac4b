"""The cases of a batch run: found in a folder tree, a manifest, a DICOMweb server or a DICOM peer.

Nothing found is dropped without a record: a DICOM file that cannot be used fails the study its
header names; a file or folder that cannot be read at all fails the study whose files sit nearest
to it (the study that alone has files in the closest folder above it), or, with no study beside
it, becomes a failed case of its own, one per folder. A study where an input's rules find no series
or several, that holds one instance twice with different pixels, or whose DICOM files hold no image
volume at all (reports, screenshots), is a failed case (:mod:`pipelines.batch.studies`).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from pipelines.batch.cases import Case, RemoteQuery, pseudonym
from pipelines.batch.errors import BatchInputError
from pipelines.batch.remote.dicomweb import discover_studies
from pipelines.batch.remote.dimse import find_studies
from pipelines.batch.remote.endpoint import Endpoint
from pipelines.batch.remote.retry import RetryPolicy
from pipelines.batch.sources import DicomWebSeriesSource, DicomWebStudy, DimseStudy
from pipelines.batch.studies import file_case, from_folder, from_manifest
from pipelines.io.formats import is_image_file
from pipelines.io.rules import SeriesRules

__all__ = ["discover_cases"]


def discover_cases(source: str | os.PathLike | Endpoint, inputs: Mapping[str, SeriesRules], section: str = "test",
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
            failure (default: :class:`~pipelines.batch.remote.retry.RetryPolicy`'s defaults).

    Returns:
        Cases sorted by id. Those that cannot be used come back with ``error`` set, so they are
        recorded as failed and the rest proceed.

    Raises:
        BatchInputError: nothing to do, or two inputs map to one case id.
    """
    inputs = {str(key): SeriesRules.of(rules) for key, rules in inputs.items()}
    if not inputs:
        raise ValueError("`inputs` must name at least one input key")
    try:
        server = source if isinstance(source, Endpoint) else Endpoint.parse(source)
    except ValueError as exc:
        raise BatchInputError(str(exc)) from exc
    if server is not None:
        read = _from_dicomweb if server.kind == "dicomweb" else _from_dimse
        cases = read(server, inputs, query or RemoteQuery(), retry or RetryPolicy())
    else:
        path = Path(source)
        if not path.exists():
            raise BatchInputError(f"{path}: no such file or folder")
        with _header_pool() as pool:
            if path.is_file() and path.suffix.lower() == ".json":
                cases = from_manifest(path, section, dataset_dir, image_key, inputs, pool)
            elif path.is_dir():
                cases = from_folder(path, inputs, pool)
            elif is_image_file(path):
                cases = [file_case(path, path.parent, inputs)]
            else:
                cases = from_folder(path, inputs, pool)  # a single DICOM file or a DICOMDIR
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


def _modalities(inputs: Mapping[str, SeriesRules]) -> set[str] | None:
    """The modalities every input's rules name, or None when one names none."""
    named = [rules.modality for rules in inputs.values()]
    if not all(named):
        return None
    return {m.upper() for wanted in named for m in ([wanted] if isinstance(wanted, str) else wanted)}


def _from_dicomweb(server: Endpoint, inputs: Mapping[str, SeriesRules], query: RemoteQuery, retry: RetryPolicy) -> list[Case]:
    """One case per study on the server with an image series (of the rules' modalities, when they
    all name some); each input's series is chosen by its rules once the study is fetched."""
    modalities = _modalities(inputs)
    try:
        found = retry.call(partial(discover_studies, server.url, modalities, query.study_uids, query.dates), "discovery")
    except ValueError as exc:
        raise BatchInputError(str(exc)) from exc
    cases = []
    for uid, listing_hash, _ in found:
        study = DicomWebStudy(server, uid, listing_hash, tuple(sorted(modalities)) if modalities else None)
        cases.append(Case(case_id=pseudonym(uid), sources={key: DicomWebSeriesSource(study) for key in inputs},
                          path=study.path, study_uid=uid, retry=retry))
    return cases


def _from_dimse(server: Endpoint, inputs: Mapping[str, SeriesRules], query: RemoteQuery, retry: RetryPolicy) -> list[Case]:
    """One case per study the DICOM peer finds (C-FIND) with an image series; each is fetched (C-GET)
    when its turn comes, and each input's series chosen by its rules."""
    try:
        found = retry.call(partial(find_studies, server.peer, query.calling_aet, query.study_uids, query.dates,
                                   _modalities(inputs)), "discovery")
    except ValueError as exc:
        raise BatchInputError(str(exc)) from exc
    cases = []
    for uid, listing_hash, series in found:
        study = DimseStudy(server, query.calling_aet, uid, listing_hash, tuple(series))
        cases.append(Case(case_id=pseudonym(uid), sources={key: DicomWebSeriesSource(study) for key in inputs},
                          path=study.path, study_uid=uid, retry=retry))
    return cases
