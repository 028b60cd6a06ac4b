"""Connected components of a mask numbered by size: the lesions that RANO measures
(:mod:`pipelines.metrics.rano`) and the batch job counts (:func:`pipelines.batch.measures.lesion_map`)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["number_components"]


def number_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The connected components (26-connectivity in 3D, 8 in 2D) of ``mask``, numbered by volume: 1 is
    the largest (ties in scan order). Returns the map (``uint16``, 0 outside) and the count."""
    mask = np.asarray(mask, bool)
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    if count == 0:
        return np.zeros(mask.shape, np.uint16), 0
    order = np.argsort(-np.bincount(components.ravel())[1:], kind="stable")
    rank = np.zeros(count + 1, np.uint16)
    rank[order + 1] = np.arange(1, count + 1, dtype=np.uint16)
    return rank[components], int(count)
