"""Group DICOM slices into series stacks and choose one with selection rules.

Slices group by SeriesInstanceUID, then by orientation and matrix size (localizers and reformats
stored in one series separate). Where positions repeat inside a group (multi-phase or multi-echo
acquisitions stored as one series), the group splits by temporal position, echo number or
acquisition number: the first of these that makes every position unique.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipelines.io.dicom.scan import SliceRecord
from pipelines.io.errors import AmbiguousSeriesError, NoImageDataError

__all__ = ["SeriesCandidate", "SeriesRules", "group_series", "orientation_label", "select_series"]

_ORIENTATIONS = ("sagittal", "coronal", "axial", "oblique")
_MAIN_AXIS = 0.9  # |normal component| at least this (about 26 degrees) names a main plane
_POSITION_DECIMALS = 3  # positions closer than 1 micrometre are the same position
_SPLIT_KEYS = ("temporal_position", "echo_number", "acquisition_number")


def orientation_label(orientation: Sequence[float]) -> str:
    """``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"oblique"`` for an ImageOrientationPatient."""
    normal = np.cross(orientation[:3], orientation[3:])
    axis = int(np.argmax(np.abs(normal)))
    return _ORIENTATIONS[axis] if abs(normal[axis]) >= _MAIN_AXIS else "oblique"


@dataclass
class SeriesCandidate:
    """Slices that may form one volume."""

    records: list[SliceRecord]
    split_by: str | None = None

    @property
    def first(self) -> SliceRecord:
        return self.records[0]

    @property
    def orientation(self) -> str:
        return orientation_label(self.first.orientation)

    @property
    def image_type(self) -> tuple[str, ...]:
        return self.first.image_type

    def describe(self) -> str:
        r = self.first
        split = f", {self.split_by} {getattr(r, self.split_by)}" if self.split_by else ""
        return (
            f"series {r.series_number if r.series_number is not None else '?'} '{r.series_description}' "
            f"({r.modality}, {len(self.records)} slices, {self.orientation}, {r.columns}x{r.rows}, "
            f"ImageType {'/'.join(r.image_type) or '-'}{split}, UID {r.series_instance_uid})"
        )


@dataclass(frozen=True)
class SeriesRules:
    """Which series to load when a path holds several. Every given rule must hold.

    Args:
        modality: a Modality or a list of them, e.g. ``"CT"`` or ``["MR"]``.
        description: regular expression searched in SeriesDescription, e.g. ``"(?i)t1.*post"``.
        image_type_include: ImageType values that must all be present, e.g. ``["ORIGINAL"]``.
        image_type_exclude: ImageType values none of which may be present, e.g. ``["LOCALIZER"]``.
        min_slices: fewest slices a series may have.
        orientation: ``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"oblique"``.
    """

    modality: str | Sequence[str] | None = None
    description: str | None = None
    image_type_include: Sequence[str] = field(default_factory=tuple)
    image_type_exclude: Sequence[str] = field(default_factory=tuple)
    min_slices: int = 1
    orientation: str | None = None

    def __post_init__(self) -> None:
        if self.orientation is not None and self.orientation not in _ORIENTATIONS:
            raise ValueError(f"`orientation` must be one of {_ORIENTATIONS}, got {self.orientation!r}")
        if not isinstance(self.min_slices, int) or self.min_slices < 1:
            raise ValueError(f"`min_slices` must be a positive integer, got {self.min_slices!r}")
        if self.description is not None:
            try:
                re.compile(self.description)
            except re.error as exc:
                raise ValueError(f"`description` must be a regular expression, got {self.description!r}: {exc}") from exc

    @property
    def given(self) -> bool:
        return self != SeriesRules()

    def rejects(self, candidate: SeriesCandidate) -> str | None:
        """Why ``candidate`` fails the rules, or None when it passes."""
        r = candidate.first
        modalities = [self.modality] if isinstance(self.modality, str) else self.modality
        if modalities is not None and r.modality not in modalities:
            return f"modality {r.modality} not in {list(modalities)}"
        if self.description is not None and not re.search(self.description, r.series_description):
            return f"description does not match {self.description!r}"
        missing = [t for t in self.image_type_include if t.upper() not in candidate.image_type]
        if missing:
            return f"ImageType lacks {missing}"
        excluded = [t for t in self.image_type_exclude if t.upper() in candidate.image_type]
        if excluded:
            return f"ImageType has {excluded}"
        if len(candidate.records) < self.min_slices:
            return f"{len(candidate.records)} slices < {self.min_slices}"
        if self.orientation is not None and candidate.orientation != self.orientation:
            return f"orientation {candidate.orientation}, not {self.orientation}"
        return None


def _projected(record: SliceRecord) -> float:
    normal = np.cross(record.orientation[:3], record.orientation[3:])
    return round(float(np.dot(normal, record.position)), _POSITION_DECIMALS)


def _has_repeats(records: list[SliceRecord]) -> bool:
    positions = [_projected(r) for r in records]
    return len(set(positions)) < len(positions)


def group_series(records: Sequence[SliceRecord]) -> list[SeriesCandidate]:
    """Candidate stacks, ordered by series number then description."""
    groups: dict[tuple, list[SliceRecord]] = defaultdict(list)
    for record in records:
        key = (record.series_instance_uid, tuple(np.round(record.orientation, 4)), record.rows, record.columns)
        groups[key].append(record)
    candidates = []
    for members in groups.values():
        candidates.extend(_split_repeats(members))
    return sorted(candidates, key=lambda c: (c.first.series_number or 0, c.first.series_description, c.describe()))


def _split_repeats(records: list[SliceRecord]) -> list[SeriesCandidate]:
    if not _has_repeats(records):
        return [SeriesCandidate(records)]
    for key in _SPLIT_KEYS:
        parts: dict[object, list[SliceRecord]] = defaultdict(list)
        for record in records:
            parts[getattr(record, key)].append(record)
        if len(parts) > 1 and not any(_has_repeats(part) for part in parts.values()):
            return [SeriesCandidate(part, split_by=key) for _, part in sorted(parts.items(), key=lambda kv: str(kv[0]))]
    return [SeriesCandidate(records)]  # repeats stay; the geometry step resolves or refuses them


def select_series(candidates: Sequence[SeriesCandidate], rules: SeriesRules, source: object) -> SeriesCandidate:
    """The one candidate the rules leave.

    Raises:
        NoImageDataError: no candidate passes; lists each with its reason.
        AmbiguousSeriesError: several pass; lists them and asks for a rule.
    """
    passing = [c for c in candidates if rules.rejects(c) is None]
    if len(passing) == 1:
        return passing[0]
    if not passing:
        reasons = "\n".join(f"  - {c.describe()}: {rules.rejects(c)}" for c in candidates)
        raise NoImageDataError(f"{source}: no DICOM series matches the selection rules:\n{reasons}")
    listing = "\n".join(f"  - {c.describe()}" for c in passing)
    hint = "narrow the rules" if rules.given else "give a selection rule (modality, description, image type, min_slices, orientation)"
    raise AmbiguousSeriesError(f"{source}: {len(passing)} DICOM series qualify; {hint}:\n{listing}")
