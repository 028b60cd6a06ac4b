"""Group DICOM slices into volumes and choose one with selection rules.

Slices group by SeriesInstanceUID, then by orientation, matrix size and the image component that
ImageType names (magnitude, phase, real, imaginary or field map; per-frame FrameType in enhanced
images), so localizers, reformats, and magnitude and phase images stored in one series separate.
Other ImageType values do not split a series: they can change within one stack (GE marks some
slices of a CT ``ADD``). Where positions repeat inside a group (multi-phase, multi-echo or 4D
acquisitions stored as one series), the group splits into volumes by temporal position, echo
number, echo time or acquisition number: the first of these (or pair of these) that makes every
position unique. When no field tells the volumes apart (GE fMRI, DWI and B0 maps), they split by
acquisition order: sorted by InstanceNumber, the k-th slice found at a position belongs to the
k-th volume, provided every volume then holds as many slices.

One instance found twice (the same SOPInstanceUID, frame and tile) is kept once when both copies
hold the same pixels; copies that differ are an error naming both files.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from pipelines.io.dicom.geometry import is_orthonormal
from pipelines.io.dicom.scan import SliceRecord
from pipelines.io.rules import ORIENTATIONS as _ORIENTATIONS
from pipelines.io.rules import SeriesRules
from pipelines.io.errors import AmbiguousSeriesError, DuplicateInstanceError, NoImageDataError
from pipelines.io.hashing import content_hash

__all__ = ["SeriesCandidate", "SeriesRules", "drop_duplicate_instances", "group_series", "orientation_label",
           "select_series"]

_MAIN_AXIS = 0.9  # |normal component| at least this (about 26 degrees) names a main plane
_POSITION_DECIMALS = 3  # positions closer than 1 micrometre are the same position
_SPLIT_KEYS = ("temporal_position", "echo_number", "echo_time", "acquisition_number")
_ORDER = "acquisition order"
# GE stores its direct field maps as two volumes in one series, told apart by nothing but their order:
# the field map in Hz first, then the magnitude (GE, in dcm2niix issue #501)
_GE_FIELD_MAP_SEQUENCES = {"b0map", "b0rf", "3db0map"}


def orientation_label(orientation: Sequence[float]) -> str:
    """``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"oblique"`` for an ImageOrientationPatient."""
    normal = np.cross(orientation[:3], orientation[3:])
    axis = int(np.argmax(np.abs(normal)))
    return _ORIENTATIONS[axis] if abs(normal[axis]) >= _MAIN_AXIS else "oblique"


def image_component(image_type: Sequence[str]) -> str | None:
    """``"magnitude"``, ``"phase"``, ``"real"``, ``"imaginary"`` or ``"field map"`` as ImageType (or
    an enhanced frame's FrameType) tells, in the spellings of Siemens (``M``, ``P``), Philips
    (``M_FFE``, ``PHASE MAP``, ``B0 MAP``) and the standard (``MAGNITUDE``, ``FIELD_MAP``); None
    when it does not say."""
    values = {v.upper() for v in image_type[2:]}  # the first two are ORIGINAL/DERIVED, PRIMARY/SECONDARY

    def has(*names: str) -> bool:
        return any(v in names or any(v.startswith(f"{n}_") for n in names if len(n) == 1) for v in values)

    if values & {"FIELD_MAP", "B0 MAP", "B0"}:
        return "field map"
    for component, names in (("phase", ("P", "PHASE", "PHASE MAP")), ("real", ("R", "REAL")),
                             ("imaginary", ("I", "IMAGINARY")), ("magnitude", ("M", "MAGNITUDE"))):
        if has(*names):
            return component
    return None


@dataclass
class SeriesCandidate:
    """Slices that may form one volume.

    Attributes:
        records: the slices.
        split_by: what told this volume apart from the others of its series (a record attribute,
            ``"acquisition order"``, or None when the series holds one volume of this kind).
        component: magnitude, phase, real, imaginary or field map, when known.
        dropped_duplicates: copies of instances found twice and left out.
    """

    records: list[SliceRecord]
    split_by: str | None = None
    component: str | None = None
    dropped_duplicates: int = 0
    order_index: int | None = field(default=None, repr=False)  # its place in the series, for "acquisition order"

    def __post_init__(self) -> None:
        if self.component is None:
            self.component = image_component(self.first.image_type)

    @property
    def first(self) -> SliceRecord:
        return self.records[0]

    @property
    def series_instance_uid(self) -> str:
        return self.first.series_instance_uid

    @property
    def orientation(self) -> str:
        return orientation_label(self.first.orientation)

    @property
    def image_type(self) -> tuple[str, ...]:
        """The ImageType values every slice has (in the first slice's order)."""
        common = set(self.first.image_type).intersection(*(r.image_type for r in self.records[1:]))
        return tuple(v for v in self.first.image_type if v in common)

    def acquisition_key(self) -> tuple:
        """Sorts the volumes of one series in acquisition order: temporal position, echo, then
        instance, frame and tile number."""
        big = float("inf")

        def lowest(attribute: str) -> float:
            values = [getattr(r, attribute) for r in self.records if getattr(r, attribute) is not None]
            return min(values) if values else big

        first = min((r.instance_number or 0, r.frame or 0, r.tile.index if r.tile else 0) for r in self.records)
        return (lowest("temporal_position"), lowest("echo_number"), lowest("echo_time"), first)

    def describe(self) -> str:
        r = self.first
        if self.split_by == _ORDER:
            split = f", volume {self.order_index + 1} in acquisition order"
        elif self.split_by:
            split = "".join(f", {key} {getattr(r, key)}" for key in self.split_by.split("+"))
        else:
            split = ""
        component = f", {self.component}" if self.component else ""
        return (
            f"series {r.series_number if r.series_number is not None else '?'} '{r.series_description}' "
            f"({r.modality}, {len(self.records)} slices, {self.orientation}, {r.columns}x{r.rows}, "
            f"ImageType {'/'.join(self.image_type) or '-'}{component}{split}, UID {r.series_instance_uid})"
        )


def _projected(record: SliceRecord) -> float:
    normal = np.cross(record.orientation[:3], record.orientation[3:])
    return round(float(np.dot(normal, record.position)), _POSITION_DECIMALS)


def _has_repeats(records: list[SliceRecord]) -> bool:
    positions = [_projected(r) for r in records]
    return len(set(positions)) < len(positions)


def group_series(records: Sequence[SliceRecord]) -> list[SeriesCandidate]:
    """Candidate volumes, ordered by series number and description, then acquisition order.

    Raises:
        DuplicateInstanceError: two files hold one instance with different pixels.
    """
    records, dropped = drop_duplicate_instances(records)
    groups: dict[tuple, list[SliceRecord]] = defaultdict(list)
    for record in records:
        key = (record.series_instance_uid, tuple(np.round(record.orientation, 4)), record.rows, record.columns,
               image_component(record.image_type))
        groups[key].append(record)
    candidates = []
    for members in groups.values():
        candidates.extend(_split_repeats(members))
    by_series: dict[str, list[SeriesCandidate]] = defaultdict(list)
    for candidate in candidates:
        by_series[candidate.series_instance_uid].append(candidate)
        candidate.dropped_duplicates = dropped.get(candidate.series_instance_uid, 0)
    ordered = []
    for members in sorted(by_series.values(), key=lambda c: (c[0].first.series_number or 0,
                                                             c[0].first.series_description, c[0].series_instance_uid)):
        ordered.extend(sorted(members, key=SeriesCandidate.acquisition_key))
    return ordered


def _split_repeats(records: list[SliceRecord]) -> list[SeriesCandidate]:
    # without a slice normal (an all-zero or broken ImageOrientationPatient) every slice would seem to
    # lie at one position: kept together, the geometry step names the tag instead of N volumes
    if not _has_repeats(records) or not is_orthonormal(records[0].orientation):
        return [SeriesCandidate(records)]
    for keys in [(key,) for key in _SPLIT_KEYS] + list(combinations(_SPLIT_KEYS, 2)):
        parts: dict[tuple, list[SliceRecord]] = defaultdict(list)
        for record in records:
            parts[tuple(getattr(record, key) for key in keys)].append(record)
        if len(parts) > 1 and not any(_has_repeats(part) for part in parts.values()):
            return [SeriesCandidate(part, split_by="+".join(keys)) for part in parts.values()]
    return _split_by_order(records)


def _split_by_order(records: list[SliceRecord]) -> list[SeriesCandidate]:
    """Volumes no field tells apart: the k-th slice at a position (in InstanceNumber, frame and
    tile order) goes to the k-th volume. Volumes of unequal size mean this is not a 4D series but
    conflicting slices: they stay together and the geometry step refuses them."""
    ordered = sorted(records, key=lambda r: (r.instance_number or 0, r.frame or 0, r.tile.index if r.tile else 0,
                                             str(r.path)))
    seen: dict[float, int] = defaultdict(int)
    volumes: dict[int, list[SliceRecord]] = defaultdict(list)
    for record in ordered:
        position = _projected(record)
        volumes[seen[position]].append(record)
        seen[position] += 1
    if len({len(v) for v in volumes.values()}) != 1:
        return [SeriesCandidate(records)]
    parts = [SeriesCandidate(volumes[k], split_by=_ORDER, order_index=k) for k in sorted(volumes)]
    first = records[0]
    if len(parts) == 2 and first.manufacturer.upper().startswith("GE") and \
            first.sequence_name.lower() in _GE_FIELD_MAP_SEQUENCES:
        parts[0].component, parts[1].component = "field map", "magnitude"
    return parts


def drop_duplicate_instances(records: Sequence[SliceRecord]) -> tuple[list[SliceRecord], dict[str, int]]:
    """``records`` with each instance (SOPInstanceUID, frame, tile) once, and per series how many
    copies were left out. Copies count as one when their files are byte-identical or, failing
    that, their pixels and geometry are equal (a copy re-encoded in another transfer syntax).

    Raises:
        DuplicateInstanceError: two files hold one instance with different pixels or geometry.
    """
    by_instance: dict[tuple, list[SliceRecord]] = defaultdict(list)
    for record in records:
        by_instance[(record.sop_instance_uid, record.frame, record.tile.index if record.tile else None)].append(record)
    if all(len(copies) == 1 for copies in by_instance.values()):
        return list(records), {}
    kept, dropped = [], defaultdict(int)
    for copies in by_instance.values():
        copies = sorted(copies, key=lambda r: str(r.path))
        for other in copies[1:]:
            if other.path != copies[0].path:
                _check_same_instance(copies[0], other)
            dropped[other.series_instance_uid] += 1
        kept.append(copies[0])
    return kept, dict(dropped)


def _check_same_instance(a: SliceRecord, b: SliceRecord) -> None:
    if content_hash(a.path) == content_hash(b.path):
        return
    from pipelines.io.dicom.decode import decode_slice

    same_geometry = (a.position, a.orientation, a.pixel_spacing, a.rows, a.columns, a.slope, a.intercept) == \
        (b.position, b.orientation, b.pixel_spacing, b.rows, b.columns, b.slope, b.intercept)
    if same_geometry and np.array_equal(decode_slice(a, {}), decode_slice(b, {})):
        return
    what = "geometry" if not same_geometry else "pixels"
    raise DuplicateInstanceError(
        f"two files hold instance {a.sop_instance_uid}{'' if a.frame is None else f' frame {a.frame + 1}'} "
        f"with different {what}: {a.path} and {b.path}"
    )


def select_series(candidates: Sequence[SeriesCandidate], rules: SeriesRules, source: object) -> SeriesCandidate:
    """The one candidate the rules leave (see :class:`SeriesRules` for ``volume`` and the preference
    for magnitude images).

    Raises:
        NoImageDataError: no candidate passes; lists each with its reason. Or ``volume`` is beyond
            the volumes of the series.
        AmbiguousSeriesError: several pass; lists them and asks for a rule (or ``volume``).
    """
    passing = [c for c in candidates if rules.rejects(c) is None]
    if not passing:
        reasons = "\n".join(f"  - {c.describe()}: {rules.rejects(c)}" for c in candidates)
        raise NoImageDataError(f"{source}: no DICOM series matches the selection rules:\n{reasons}")
    series = {c.series_instance_uid for c in passing}
    if rules.volume is not None:
        if len(series) > 1:
            raise AmbiguousSeriesError(
                f"{source}: `volume` picks among the volumes of one series, but {len(series)} series qualify; "
                f"narrow the rules:\n" + _listing(passing)
            )
        if rules.volume >= len(passing):
            raise NoImageDataError(
                f"{source}: volume {rules.volume} asked, but the series holds {len(passing)} volume(s) "
                f"that pass the rules (0-based):\n" + _listing(passing, numbered=True)
            )
        return passing[rules.volume]
    if len(passing) > 1:
        passing = _prefer_magnitude(passing)
    if len(passing) == 1:
        return passing[0]
    if len(series) == 1:
        raise AmbiguousSeriesError(
            f"{source}: the series holds {len(passing)} volumes; pass volume=k (0-based, in acquisition order) "
            f"or a rule that picks one:\n" + _listing(passing, numbered=True)
        )
    hint = ("narrow the rules" if rules.given
            else "give a selection rule (modality, description, image type, min_slices, orientation)")
    raise AmbiguousSeriesError(f"{source}: {len(passing)} DICOM series qualify; {hint}:\n" + _listing(passing))


def _prefer_magnitude(candidates: list[SeriesCandidate]) -> list[SeriesCandidate]:
    """Within each series that stores its magnitude image beside phase, real, imaginary or field-map
    images, keep the magnitude."""
    by_series: dict[str, list[SeriesCandidate]] = defaultdict(list)
    for candidate in candidates:
        by_series[candidate.series_instance_uid].append(candidate)
    kept = []
    for members in by_series.values():
        magnitude = [c for c in members if c.component == "magnitude"]
        others = [c for c in members if c.component not in (None, "magnitude")]
        kept.extend(magnitude if magnitude and others and len(magnitude) + len(others) == len(members) else members)
    chosen = {id(c) for c in kept}
    return [c for c in candidates if id(c) in chosen]


def _listing(candidates: Sequence[SeriesCandidate], numbered: bool = False) -> str:
    if numbered:
        return "\n".join(f"  - volume {k}: {c.describe()}" for k, c in enumerate(candidates))
    return "\n".join(f"  - {c.describe()}" for c in candidates)
