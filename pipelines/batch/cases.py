"""A case of a batch run: one study (a series chosen for each of the bundle's inputs by that input's
rules), one image file, or one manifest entry; found by :mod:`pipelines.batch.discovery`.

Case ids are pseudonymous (a hash of the StudyInstanceUID or of the file's relative path; a
manifest's own ``case_id``), so no patient name or ID reaches a file name or a log line.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pipelines.batch.errors import BatchInputError
from pipelines.batch.remote.dimse import check_ae_title
from pipelines.batch.remote.retry import RetryPolicy
from pipelines.batch.sources import DicomWebSeriesSource, Source
from pipelines.io.rules import SeriesRules

__all__ = ["Case", "RemoteQuery", "pseudonym"]


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


@dataclass(frozen=True)
class RemoteQuery:
    """Which studies of a server to take, and as whom: ``study_uids``, or a StudyDate in ``dates``
    (``YYYYMMDD`` or ``YYYYMMDD-YYYYMMDD``); ``calling_aet`` the AE title a DICOM peer sees."""

    study_uids: tuple[str, ...] = ()
    dates: str | None = None
    calling_aet: str = "UNETPIPELINES"

    def __post_init__(self) -> None:
        try:
            check_ae_title(self.calling_aet, "--calling-aet")
        except ValueError as exc:
            raise BatchInputError(str(exc)) from exc
        if self.dates is not None and not re.fullmatch(r"\d{8}(-\d{8})?|\d{8}-|-\d{8}", self.dates):
            raise BatchInputError(f"--study-date must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD, got {self.dates!r}")
        bad = [uid for uid in self.study_uids if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) or len(uid) > 64]
        if bad:
            raise BatchInputError(f"--study-uid must be DICOM UIDs (digits and dots, at most 64), got {bad}")
