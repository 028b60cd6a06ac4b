"""highdicom's IOD lookups, memoised for the process.

For every source image of a DICOM SEG, highdicom asks whether its IOD holds the pixel data and frame
attributes; each answer is a linear scan of the standard's module tables, and for a series of a few
dozen slices these scans are a large share of the SEG's cost (docs/benchmarks.md, "Writing results"). The answer
depends only on the arguments and on the tables shipped with highdicom (pinned), so it is cached;
errors (an unknown SOP class) are not. The cache gives highdicom's own answers, so it is installed
once and left in place: :func:`pipelines.io.dicom_seg.write_dicom_seg` installs it before each SEG.
"""

from __future__ import annotations

import functools
import logging

__all__ = ["memoise_iod_lookups"]

logger = logging.getLogger(__name__)


def memoise_iod_lookups() -> None:
    """Memoise highdicom's ``_standard_utils.is_attribute_in_iod`` (once per process; later calls do nothing).

    highdicom's own modules call it through ``highdicom._standard_utils``, where it is replaced; the
    replacement carries ``memoised = True`` and the original as ``__wrapped__``.
    """
    from highdicom import _standard_utils as standard

    original = getattr(standard, "is_attribute_in_iod", None)
    if original is None or getattr(original, "memoised", False):
        if original is None:
            logger.debug("highdicom has no _standard_utils.is_attribute_in_iod; IOD lookups are not cached")
        return

    @functools.lru_cache(maxsize=4096)
    def cached(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return original(attribute, sop_class_uid, exclude_path_elements=None if exclude is None else list(exclude))

    @functools.wraps(original)
    def is_attribute_in_iod(attribute, sop_class_uid, exclude_path_elements=None) -> bool:
        exclude = None if exclude_path_elements is None else tuple(exclude_path_elements)
        return cached(str(attribute), str(sop_class_uid), exclude)

    is_attribute_in_iod.memoised = True  # type: ignore[attr-defined]
    standard.is_attribute_in_iod = is_attribute_in_iod
