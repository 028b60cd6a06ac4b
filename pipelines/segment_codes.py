"""The segments a bundle's ``metadata.json`` names: label value, name and SNOMED CT codes.

Dependency-free, so both the batch job's DICOM SEG writer (:mod:`pipelines.io.dicom_seg`) and the
MONAI Label app (:mod:`pipelines.label.seg_codes`, in an environment with pydicom 2) read the same
``dicom_seg_segments`` the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["SegmentCode", "segments_from_metadata"]

_KEYS = ("label", "name", "category", "type")


@dataclass(frozen=True)
class SegmentCode:
    """One segment: the label value in the map, its name, and its SNOMED CT (or other) codes.

    ``category`` and ``type`` are ``(code value, coding scheme, code meaning)``, e.g.
    ``("49755003", "SCT", "Morphologically Altered Structure")`` and ``("108369006", "SCT", "Neoplasm")``;
    ``color`` the display colour (RGB, 0-255) a viewer or planning system shows it in, if given.
    """

    label: int
    name: str
    category: tuple[str, str, str]
    type: tuple[str, str, str]
    color: tuple[int, int, int] | None = None


def segments_from_metadata(metadata: Mapping) -> list[SegmentCode]:
    """Segments from a bundle's ``metadata.json``: its ``dicom_seg_segments`` list of
    ``{"label", "name", "category": [code, scheme, meaning], "type": [code, scheme, meaning]}``,
    optionally with ``"color": [r, g, b]`` (0-255)."""
    entries = metadata.get("dicom_seg_segments")
    if not entries:
        raise ValueError("bundle metadata has no `dicom_seg_segments` (label, name and SNOMED CT codes per segment)")
    for entry in entries:
        if not isinstance(entry, Mapping) or not set(_KEYS) <= set(entry):
            raise ValueError(f"a dicom_seg_segments entry must have label, name, category and type, got {entry}")
        color = entry.get("color")
        if color is not None and (not isinstance(color, (list, tuple)) or len(color) != 3
                                  or not all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
            raise ValueError(f"a dicom_seg_segments color must be [r, g, b], whole numbers 0-255, got {color!r}")
    return [
        SegmentCode(int(e["label"]), str(e["name"]), tuple(e["category"]), tuple(e["type"]),  # type: ignore[arg-type]
                    tuple(e["color"]) if e.get("color") else None)
        for e in entries
    ]
