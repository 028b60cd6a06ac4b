"""Where one input of a case comes from, and how it is loaded: a DICOM series found in a folder, an
image file, or a series of a study on a DICOMweb server. Each source loads itself (``load``), says
what changed in it (``input_hash``) and describes itself for ``record.json`` (``describe``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.batch.remote.dicomweb import download_study
from pipelines.batch.remote.dimse_get import retrieve_study
from pipelines.batch.remote.endpoint import Endpoint
from pipelines.io.rules import SeriesRules

__all__ = ["DicomSeriesSource", "DicomWebSeriesSource", "DicomWebStudy", "DimseStudy", "ImageFileSource", "Source",
           "stat_hash"]


def stat_hash(paths, extra: str = "") -> str:
    """Hash of the files' names, sizes and modification times: changes when a file is replaced."""
    digest = hashlib.sha256(extra.encode())
    for path in sorted(str(p) for p in paths):
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class Source:
    """One input of a case. ``load`` returns a ``(C, *spatial)`` MetaTensor with an RAS affine."""

    kind = "source"

    def load(self, rules: SeriesRules, options: Mapping, cache_dir: Path):
        raise NotImplementedError

    def input_hash(self) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


@dataclass
class DicomSeriesSource(Source):
    """A series chosen in a folder of DICOM files (the study's folder names it in messages)."""

    series: object  # pipelines.io.dicom.SeriesCandidate
    folder: str
    kind = "dicom"

    def load(self, rules: SeriesRules, options: Mapping, cache_dir: Path):
        from pipelines.io import load_series  # the loaders import MONAI: see pipelines.batch.bundle

        return load_series(self.series, self.folder, **options)

    def input_hash(self) -> str:
        return stat_hash({r.path for r in self.series.records}, extra=self.series.first.series_instance_uid)

    def describe(self) -> dict:
        first = self.series.first
        return {"kind": self.kind, "path": self.folder, "series_instance_uid": first.series_instance_uid,
                "study_instance_uid": first.study_instance_uid}


@dataclass
class ImageFileSource(Source):
    """An image file: NIfTI, NRRD, MHA/MHD, PNG or TIFF."""

    path: str
    kind = "file"

    def load(self, rules: SeriesRules, options: Mapping, cache_dir: Path):
        from pipelines.io import load_volume  # the loaders import MONAI: see pipelines.batch.bundle

        return load_volume(self.path, **options)

    def input_hash(self) -> str:
        return stat_hash([self.path])

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path}


@dataclass
class DicomWebStudy:
    """A study on a DICOMweb server, fetched (WADO-RS) once per case into the run's cache."""

    server: Endpoint
    study_uid: str
    listing_hash: str  # of its series and instance counts: changes when the server's study does
    modalities: tuple[str, ...] | None = None
    folder: Path | None = field(default=None, compare=False)
    kind = "dicomweb"

    def fetch(self, cache_dir: Path) -> Path:
        if self.folder is None:
            target = cache_dir / hashlib.sha256(self.study_uid.encode()).hexdigest()[:16]
            self.folder = download_study(self.server.url, self.study_uid, target, self.modalities)
        return self.folder

    @property
    def path(self) -> str:
        return f"{self.server.url.rstrip('/')}/studies/{self.study_uid}"


@dataclass
class DimseStudy:
    """A study on a DICOM peer, fetched (C-GET) once per case into the run's cache: its image series,
    found when the run started."""

    server: Endpoint
    calling_aet: str
    study_uid: str
    listing_hash: str  # of its series and instance counts: changes when the peer's study does
    series_uids: tuple[str, ...]
    folder: Path | None = field(default=None, compare=False)
    kind = "dimse"

    def fetch(self, cache_dir: Path) -> Path:
        if self.folder is None:
            target = cache_dir / hashlib.sha256(self.study_uid.encode()).hexdigest()[:16]
            self.folder = retrieve_study(self.server.peer, self.calling_aet, self.study_uid, self.series_uids, target)
        return self.folder

    @property
    def path(self) -> str:
        return f"{self.server.url.rstrip('/')}/studies/{self.study_uid}"


@dataclass
class DicomWebSeriesSource(Source):
    """The series of a remote study (DICOMweb or DIMSE) that one input's rules choose, once the study
    is fetched."""

    study: DicomWebStudy | DimseStudy

    @property
    def kind(self) -> str:
        return self.study.kind

    def load(self, rules: SeriesRules, options: Mapping, cache_dir: Path):
        from pipelines.io import load_volume  # the loaders import MONAI: see pipelines.batch.bundle

        return load_volume(self.study.fetch(cache_dir), rules, **options)

    def input_hash(self) -> str:
        return self.study.listing_hash

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.study.path, "study_instance_uid": self.study.study_uid,
                "url": self.study.server.url}
