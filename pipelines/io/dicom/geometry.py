"""Where each slice of a DICOM stack lies, and whether it forms a regular grid.

Slices are sorted by ImagePositionPatient projected on the slice normal (never by InstanceNumber),
the slice spacing comes from those positions (never from SliceThickness). A stack is regular when
its positions are evenly spaced along the normal; gantry tilt shifts each slice within its plane,
and uneven spacing breaks the even steps. Both are corrected by resampling (see ``volume``) unless
``strict=True``, which refuses them.

Uneven is not missing: a CT reconstructed with thin slices through the skull base and thicker ones
above (each zone evenly spaced) is legitimate data. The steps are cut into zones of equal steps; a
zone is refused as missing slices only when its step is a whole multiple (2x or more) of the
spacing on both sides of it (or, at either end of the stack, one step that is a whole multiple of
the zone next to it). Uneven stacks are resampled at the spacing of their finest zone, so its
slices keep their resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipelines.io.dicom.scan import SliceRecord
from pipelines.io.errors import GeometryError

__all__ = ["StackGeometry", "plan_stack"]

_SAME_POSITION_MM = 1e-3
_UNEVEN_TOLERANCE = 0.01  # relative spread of the steps above which spacing is uneven (and zones differ)
_MULTIPLE_TOLERANCE = 0.1  # a step within this of k times the spacing around it (k >= 2) skips k - 1 slices
_TILT_TOLERANCE_PX = 0.01  # in-plane shift (pixels) above which slices are sheared (gantry tilt)


@dataclass
class StackGeometry:
    """Sorted slices and the grid they need (patient coordinates, LPS, millimetres).

    Attributes:
        records: slices sorted along the normal, duplicates removed.
        row, col, normal: unit vectors of increasing column index, increasing row index, and slice order.
        spacing_x, spacing_y: distance between columns and between rows.
        positions: each slice's position along ``normal``.
        offsets: ``(N, 2)`` in-plane shift of each slice's first pixel from the first slice's, in pixels
            (columns, rows); zero without gantry tilt.
        slice_spacing: spacing of the output grid along ``normal``.
        corrections: what resampling will correct, as JSON-ready dicts.
    """

    records: list[SliceRecord]
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    spacing_x: float
    spacing_y: float
    positions: np.ndarray
    offsets: np.ndarray
    slice_spacing: float
    corrections: list[dict] = field(default_factory=list)

    @property
    def regular(self) -> bool:
        return not any(c["type"] in ("gantry_tilt", "uneven_spacing") for c in self.corrections)


def is_orthonormal(orientation) -> bool:
    """Whether an ImageOrientationPatient holds two unit, orthogonal vectors (to 1 %)."""
    row, col = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    return abs(np.linalg.norm(row) - 1) <= 1e-2 and abs(np.linalg.norm(col) - 1) <= 1e-2 and abs(row @ col) <= 1e-2


def plan_stack(records: list[SliceRecord], strict: bool = False, source: object = "") -> StackGeometry:
    """Sort ``records`` of one candidate series and check that they form a volume.

    Raises:
        GeometryError: mixed pixel spacing or orientation, two different slices at one position,
            missing slices (see the module docstring), or with ``strict=True`` gantry tilt or
            uneven spacing; the message names the files or the measured values.
    """
    first = records[0]
    row = np.asarray(first.orientation[:3], dtype=float)
    col = np.asarray(first.orientation[3:], dtype=float)
    if not is_orthonormal(first.orientation):
        raise GeometryError(f"{first.path}: ImageOrientationPatient {list(first.orientation)} is not two unit, orthogonal vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    spacing_y, spacing_x = first.pixel_spacing
    for record in records:
        if not np.allclose(record.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise GeometryError(
                f"{source}: slices with different PixelSpacing: {list(first.pixel_spacing)} in {first.path}, "
                f"{list(record.pixel_spacing)} in {record.path}"
            )

    corrections: list[dict] = []
    ordered = sorted(records, key=lambda r: (float(normal @ r.position), r.instance_number or 0))
    ordered = _drop_duplicates(ordered, normal, corrections, source)
    positions = np.array([normal @ r.position for r in ordered])
    origin = np.asarray(ordered[0].position)
    shifts = np.array([np.asarray(r.position) - origin for r in ordered])
    in_plane = shifts - np.outer(shifts @ normal, normal)
    # snapped to a millionth of a pixel: floating-point noise must not move a slice off its own edge
    offsets = np.round(np.stack([in_plane @ row / spacing_x, in_plane @ col / spacing_y], axis=1), 6) + 0.0

    if len(ordered) == 1:
        thickness = first.slice_thickness or 1.0
        return StackGeometry(ordered, row, col, normal, spacing_x, spacing_y, positions, offsets, thickness, corrections)

    steps = np.diff(positions)
    zones = _zones(steps)
    gap = _missing_slices(zones)
    if gap is not None:
        index, around = gap
        a, b = ordered[index], ordered[index + 1]
        raise GeometryError(
            f"{source}: missing slices: a gap of {steps[index]:.3f} mm between the slices at "
            f"{positions[index]:.3f} and {positions[index + 1]:.3f} mm along the normal (spacing around it "
            f"{around:.3f} mm), between {a.path} and {b.path}"
        )
    slice_spacing = float((positions[-1] - positions[0]) / (len(ordered) - 1))
    if len(zones) > 1:
        if strict:
            raise GeometryError(
                f"{source}: uneven slice spacing from {steps.min():.4f} to {steps.max():.4f} mm "
                "(strict=True refuses to resample)"
            )
        # the finest zone of two or more steps (a single step between zones is a transition), adjusted
        # so the grid runs exactly from the first to the last slice
        regular = [step for start, end, step in zones if end - start > 1]
        finest = min(regular) if regular else float(np.median(steps))
        span = float(positions[-1] - positions[0])
        slice_spacing = span / max(round(span / finest), 1)
        corrections.append(
            {"type": "uneven_spacing", "min_mm": float(steps.min()), "max_mm": float(steps.max()),
             "resampled_to_mm": slice_spacing,
             "zones": [{"slices": end - start + 1, "spacing_mm": round(step, 4)} for start, end, step in zones]}
        )
    if np.abs(offsets).max() > _TILT_TOLERANCE_PX:
        angle = math.degrees(math.atan2(float(np.linalg.norm(in_plane[-1])), float(positions[-1] - positions[0])))
        if strict:
            raise GeometryError(
                f"{source}: gantry tilt of {angle:.2f} degrees (slices shifted in their plane; "
                "strict=True refuses to resample)"
            )
        corrections.append({"type": "gantry_tilt", "angle_deg": angle})
    return StackGeometry(ordered, row, col, normal, spacing_x, spacing_y, positions, offsets, slice_spacing, corrections)


def _zones(steps: np.ndarray) -> list[tuple[int, int, float]]:
    """Runs of equal consecutive steps (within :data:`_UNEVEN_TOLERANCE`): ``(first step, end, mean step)``."""
    zones, start = [], 0
    for i in range(1, len(steps) + 1):
        if i == len(steps) or abs(steps[i] - steps[start]) > _UNEVEN_TOLERANCE * max(steps[start], steps[i]):
            zones.append((start, i, float(np.mean(steps[start:i]))))
            start = i
    return zones


def _missing_slices(zones: list[tuple[int, int, float]]) -> tuple[int, float] | None:
    """The first step of a zone that skips slices, and the spacing around it; None when none does."""

    def multiple(step: float, spacing: float) -> bool:
        ratio = step / spacing
        return round(ratio) >= 2 and abs(ratio - round(ratio)) <= _MULTIPLE_TOLERANCE

    for z, (start, end, step) in enumerate(zones):
        before = zones[z - 1][2] if z > 0 else None
        after = zones[z + 1][2] if z + 1 < len(zones) else None
        if before is not None and after is not None:
            same_around = abs(before - after) <= _UNEVEN_TOLERANCE * max(before, after)
            if same_around and multiple(step, before):
                return start, before
        elif (before or after) is not None and end - start == 1 and multiple(step, before or after):
            return start, before or after
    return None


def _drop_duplicates(ordered: list[SliceRecord], normal: np.ndarray, corrections: list[dict], source: object) -> list[SliceRecord]:
    """Keep one copy of an instance found twice; refuse two different slices at one position."""
    kept = [ordered[0]]
    dropped = 0
    for record in ordered[1:]:
        previous = kept[-1]
        if abs(normal @ np.subtract(record.position, previous.position)) > _SAME_POSITION_MM:
            kept.append(record)
        elif (record.sop_instance_uid, record.frame) == (previous.sop_instance_uid, previous.frame):
            dropped += 1
        else:
            raise GeometryError(
                f"{source}: two different slices at position {float(normal @ record.position):.3f} mm "
                f"along the normal: {previous.path} and {record.path}"
            )
    if dropped:
        corrections.append({"type": "duplicate_instances_dropped", "count": dropped})
    return kept
