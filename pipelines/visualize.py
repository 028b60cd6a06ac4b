"""Label maps drawn over images, for QC pictures and validation overlays. numpy only: no engine,
no torch, so the batch job and the training engines share it without importing each other."""

from __future__ import annotations

import numpy as np

__all__ = ["LABEL_COLOURS", "label_colour", "overlay_slice"]

# label colours (RGB) for labels 1, 2, ...; further labels cycle
LABEL_COLOURS = np.array([[230, 60, 40], [250, 200, 40], [60, 160, 240], [90, 220, 120]], dtype=np.float32)


def label_colour(value: int) -> np.ndarray:
    """The RGB colour label ``value`` (1, 2, ...) is drawn in, here and on the case pages."""
    return LABEL_COLOURS[(int(value) - 1) % len(LABEL_COLOURS)]


def overlay_slice(image: np.ndarray, label: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB ``(H, W, 3)`` uint8 of a 2D image with a label map blended on top.

    The image is windowed to its 1st-99th percentile; label 0 is left clear.
    """
    low, high = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    grey = np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value in np.unique(label[label > 0]):
        mask = label == value
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * label_colour(value)
    return rgb.astype(np.uint8)
