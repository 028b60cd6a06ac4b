"""Which DICOM volume to load when a path holds several: :class:`SeriesRules`, the one vocabulary
of series selection (``load_volume``, ``LoadVolumed``, bundle configs, the batch job and the command
line all take it). No imports beyond the standard library, so that ``--help`` stays instant."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.io.dicom.series import SeriesCandidate

__all__ = ["ORIENTATIONS", "SeriesRules"]

ORIENTATIONS = ("sagittal", "coronal", "axial", "oblique")


@dataclass(frozen=True)
class SeriesRules:
    """Which volume to load when a path holds several. Every given rule must hold.

    Args:
        modality: a Modality or a list of them, e.g. ``"CT"`` or ``["MR"]``.
        description: regular expression searched in SeriesDescription, e.g. ``"(?i)t1.*post"``.
        image_type_include: ImageType values that must all be present, e.g. ``["ORIGINAL"]``
            (an enhanced image's per-frame FrameType counts as its frames' ImageType).
        image_type_exclude: ImageType values none of which may be present, e.g. ``["LOCALIZER"]``.
        min_slices: fewest slices a series may have.
        orientation: ``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"oblique"``.
        volume: when one series holds several volumes (time points, echoes, diffusion directions,
            magnitude and phase), the ``volume``-th of those the other rules leave, 0-based, in
            acquisition order (temporal position, echo, then instance number). Without it a
            series' magnitude image is preferred to its phase, real, imaginary or field-map images;
            several volumes left are an :class:`AmbiguousSeriesError` listing them.
    """

    # metadata: how the command line takes each rule (pipelines.cli builds its flags from these)
    modality: str | Sequence[str] | None = field(default=None, metadata={"nargs": "+", "help": "Modality, e.g. CT MR"})
    description: str | None = field(default=None, metadata={"help": "regular expression searched in SeriesDescription"})
    image_type_include: Sequence[str] = field(default=(), metadata={"nargs": "+",
                                                                    "help": "ImageType values all required"})
    image_type_exclude: Sequence[str] = field(default=(), metadata={"nargs": "+", "help": "ImageType values refused"})
    min_slices: int = field(default=1, metadata={"type": int, "help": "fewest slices"})
    orientation: str | None = field(default=None, metadata={"choices": ORIENTATIONS, "help": "main plane"})
    volume: int | None = field(default=None, metadata={
        "type": int, "help": "the k-th volume (0-based, in acquisition order) of a series holding several "
                             "(time points, echoes, magnitude and phase)"})

    @classmethod
    def of(cls, rules: SeriesRules | Mapping | None = None, **options) -> SeriesRules:
        """``rules`` (a SeriesRules, a mapping of its fields as in a bundle config, or None) with
        ``options`` over it. Lists become tuples; an unknown name is a TypeError naming it."""
        base = rules if isinstance(rules, SeriesRules) else cls(**_tuples(dict(rules or {})))
        return replace(base, **_tuples(options)) if options else base

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The rule names, as keyword arguments, config keys and (with dashes) command-line flags."""
        return tuple(f.name for f in fields(cls))

    def as_dict(self) -> dict:
        """The rules that differ from the defaults, JSON-ready (for records and run keys)."""
        default = SeriesRules()
        return {name: (list(value) if isinstance(value, tuple) else value)
                for name in self.names() if (value := getattr(self, name)) != getattr(default, name)}

    def __post_init__(self) -> None:
        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise ValueError(f"`orientation` must be one of {ORIENTATIONS}, got {self.orientation!r}")
        if not isinstance(self.min_slices, int) or self.min_slices < 1:
            raise ValueError(f"`min_slices` must be a positive integer, got {self.min_slices!r}")
        if self.volume is not None and (isinstance(self.volume, bool) or not isinstance(self.volume, int)
                                        or self.volume < 0):
            raise ValueError(f"`volume` must be a non-negative integer or None, got {self.volume!r}")
        if self.description is not None:
            try:
                re.compile(self.description)
            except re.error as exc:
                raise ValueError(
                    f"`description` must be a regular expression, got {self.description!r}: {exc}") from exc

    @property
    def given(self) -> bool:
        return self != SeriesRules()

    def rejects(self, candidate: SeriesCandidate) -> str | None:
        """Why ``candidate`` fails the rules (all but ``volume``), or None when it passes."""
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


def _tuples(options: dict) -> dict:
    unknown = set(options) - set(SeriesRules.names())
    if unknown:
        raise TypeError(f"unknown DICOM series rule(s) {sorted(unknown)}; the rules are {list(SeriesRules.names())}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
