"""QC picture of one case: axial, coronal and sagittal slices through the largest lesion, or a 2D
section with its labels."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pipelines.io.writers import atomic_path
from pipelines.visualize import overlay_slice

__all__ = ["qc_picture", "qc_thumbnail", "save_qc_picture"]

_PANEL_PX = 320  # the largest field of view is drawn this many pixels wide or high
_CAPTION_PX = 16
THUMBNAIL_WIDTH = 420  # the run report's pictures
OUTLINE_RGB = (0, 200, 255)  # the brain's border (the labels' colours: pipelines.visualize)


def _canonical(image: np.ndarray, labels: np.ndarray, affine, point: Sequence[int], outline: np.ndarray | None = None):
    """The volumes flipped/permuted to the closest RAS axes, with the point and spacing moved along."""
    affine = np.asarray(affine, float)
    orientation = nib.orientations.io_orientation(affine)
    image = nib.orientations.apply_orientation(image, orientation)
    labels = nib.orientations.apply_orientation(labels, orientation)
    if outline is not None:
        outline = nib.orientations.apply_orientation(outline, orientation)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    new_point, new_spacing = [0, 0, 0], [1.0, 1.0, 1.0]
    for old_axis, (new_axis, flip) in enumerate(orientation):
        size = labels.shape[int(new_axis)]
        new_point[int(new_axis)] = size - 1 - point[old_axis] if flip < 0 else point[old_axis]
        new_spacing[int(new_axis)] = spacing[old_axis]
    return image, labels, new_point, new_spacing, outline


def _panel(image2d: np.ndarray, labels2d: np.ndarray, spacing2d: Sequence[float], mm_per_px: float,
           outline2d: np.ndarray | None = None) -> Image.Image:
    """A slice ``(horizontal, vertical)`` in RAS order drawn radiologically: patient's right on the
    left (axial, coronal), anterior on the left (sagittal), superior or anterior at the top; the
    border of ``outline2d`` (a mask) drawn one pixel wide in :data:`OUTLINE_RGB`."""
    image2d = image2d.T[::-1, ::-1]
    labels2d = labels2d.T[::-1, ::-1]
    height = max(1, round(image2d.shape[0] * spacing2d[1] / mm_per_px))
    width = max(1, round(image2d.shape[1] * spacing2d[0] / mm_per_px))
    grey = np.asarray(Image.fromarray(np.ascontiguousarray(image2d, np.float32)).resize((width, height), Image.BILINEAR))
    lab = np.asarray(Image.fromarray(np.ascontiguousarray(labels2d, np.uint8)).resize((width, height), Image.NEAREST))
    rgb = overlay_slice(grey, lab)
    if outline2d is not None:
        inside = np.asarray(Image.fromarray(np.ascontiguousarray(outline2d.T[::-1, ::-1], np.uint8))
                            .resize((width, height), Image.NEAREST)) > 0
        rgb = np.array(rgb)
        rgb[inside & ~ndimage.binary_erosion(inside, border_value=1)] = OUTLINE_RGB
    return Image.fromarray(rgb)


def qc_picture(image, labels: np.ndarray, affine, point: Sequence[int] | None = None,
               caption: str = "", outline: np.ndarray | None = None) -> Image.Image:
    """RGB picture: axial | coronal | sagittal slices through ``point`` (voxel index; default the
    volume's centre) of ``image`` ``(X, Y, Z)`` with ``labels`` blended on top, at true aspect ratio;
    for a 2D section ``(X, Y)`` (a picture, x along its columns) the section with its labels.

    ``image`` may also map names to volumes of the labels' shape (the channels of a multi-parametric
    study, e.g. FLAIR and T1c on the reference grid): one row of the three views per volume, named.
    The display follows radiological convention whatever the storage order of the volume.
    ``outline``: a mask of the labels' shape (the brain extracted from a whole head) whose border is
    drawn on every 3D view.
    """
    images = dict(image) if isinstance(image, Mapping) else {"": image}
    labels = np.asarray(labels).astype(np.uint8)
    if not images:
        raise ValueError("`image` names no volume")
    rows = []
    for name, volume in images.items():
        volume = np.asarray(volume, np.float32)
        if volume.shape != labels.shape or volume.ndim not in (2, 3):
            raise ValueError(f"`image` {name + ' ' if name else ''}and `labels` must be 2D or 3D arrays of one shape, "
                             f"got {volume.shape} and {labels.shape}")
        prefix = f"{name} " if name else ""
        if volume.ndim == 2:
            rows.append([(f"{prefix}section", Image.fromarray(overlay_slice(volume.T, labels.T)))])
        else:
            rows.append(_views(volume, labels, affine, point, prefix, outline))
    return _captioned(rows, caption)


def _views(image: np.ndarray, labels: np.ndarray, affine, point: Sequence[int] | None, prefix: str,
           outline: np.ndarray | None = None) -> list:
    if point is None:
        point = [s // 2 for s in labels.shape]
    if outline is not None and np.shape(outline) != labels.shape:
        raise ValueError(f"`outline` must have the labels' shape {labels.shape}, got {np.shape(outline)}")
    image, labels, (i, j, k), spacing, outline = _canonical(image, labels, affine, point, outline)
    fov = max(n * s for n, s in zip(labels.shape, spacing))
    mm_per_px = fov / _PANEL_PX
    cut = (lambda index: None) if outline is None else (lambda index: outline[index])
    return [
        (f"{prefix}axial", _panel(image[:, :, k], labels[:, :, k], (spacing[0], spacing[1]), mm_per_px,
                                  cut((slice(None), slice(None), k)))),
        (f"{prefix}coronal", _panel(image[:, j, :], labels[:, j, :], (spacing[0], spacing[2]), mm_per_px,
                                    cut((slice(None), j, slice(None))))),
        (f"{prefix}sagittal", _panel(image[i, :, :], labels[i, :, :], (spacing[1], spacing[2]), mm_per_px,
                                     cut((i, slice(None), slice(None))))),
    ]


def _captioned(rows: list[list[tuple[str, Image.Image]]], caption: str) -> Image.Image:
    """Each row's panels side by side, each named above it; the rows one below the other; the caption
    below."""
    width = max(sum(p.width for _, p in row) + 4 * (len(row) - 1) for row in rows)
    heights = [max(p.height for _, p in row) + _CAPTION_PX for row in rows]
    canvas = Image.new("RGB", (width, sum(heights) + _CAPTION_PX), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for row, height in zip(rows, heights):
        x = 0
        for name, panel in row:
            canvas.paste(panel, (x, y + _CAPTION_PX))
            draw.text((x + 4, y + 2), name, fill=(255, 255, 255))
            x += panel.width + 4
        y += height
    if caption:
        draw.text((4, y + 2), caption, fill=(255, 255, 255))
    return canvas


def qc_thumbnail(picture: Image.Image, width: int = THUMBNAIL_WIDTH) -> Image.Image:
    """``picture`` (RGB) scaled down to ``width`` pixels, aspect kept; unchanged when narrower."""
    if picture.width <= width:
        return picture
    return picture.resize((width, max(1, picture.height * width // picture.width)))


def save_qc_picture(path: str | os.PathLike, *args, thumbnail: str | os.PathLike | None = None, **kwargs) -> Path:
    """:func:`qc_picture` written as PNG, atomically, and its :func:`qc_thumbnail` to ``thumbnail``
    when given (the run report inlines it: made here, beside the picture, rather than decoded and
    scaled again for every case when the report is written at the end of a run). zlib level 1: several
    times faster to write than Pillow's default 6, for files a fifth larger."""
    path = Path(path)
    picture = qc_picture(*args, **kwargs)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG", compress_level=1)
    if thumbnail is not None:
        with atomic_path(thumbnail) as tmp:
            qc_thumbnail(picture).save(tmp, format="PNG", compress_level=1)
    return path
