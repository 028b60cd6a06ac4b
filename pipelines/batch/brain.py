"""What the bundle's brain extraction found for a case (:class:`pipelines.transforms.ExtractBraind`
in its preprocessing), on the way to the outputs: the record's ``brain_extraction`` and, for a
whole-head study, ``brain_mask.nii.gz`` on the reference grid and its outline in the QC picture."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pipelines.io.writers import resample_labels

__all__ = ["BRAIN_MASK", "BrainExtraction", "brain_extraction"]

BRAIN_MASK = "brain_mask"  # ExtractBraind's mask_key in the bundles; also <key>_native, <key>_extraction


@dataclass(frozen=True)
class BrainExtraction:
    """``report``: method, channel, brain and head volumes (mL), coverage, used or why not;
    ``mask``: the brain ``(*spatial)`` bool on the reference grid when it was used, else None."""

    report: Mapping
    mask: np.ndarray | None = None


def brain_extraction(data: Mapping, reference) -> BrainExtraction | None:
    """From preprocessed ``data``: the extraction's report and mask (put on the grid of ``reference``,
    a ``(C, *spatial)`` MetaTensor); None when the bundle extracts no brain."""
    report = data.get(f"{BRAIN_MASK}_extraction")
    if report is None:
        return None
    found = data.get(f"{BRAIN_MASK}_native", data.get(BRAIN_MASK))
    mask = None
    if found is not None:
        mask = resample_labels(np.asarray(found)[0], np.asarray(found.affine, dtype=np.float64), reference.shape[1:],
                               np.asarray(reference.affine, dtype=np.float64)).astype(bool)
    return BrainExtraction(dict(report), mask)
