"""What a case page shows its images with: NiiVue's browser build, and the images as it reads them.

NiiVue (npm ``@niivue/niivue``, pinned in ``package.json``, installed by ``make web-deps``) is copied
into each run's output once (``_viewer/``), so the pages work from ``file://`` on a computer without
internet. A browser will not let a page read files beside it from ``file://``, so each page carries
its images inline: gzipped NIfTI in base64, one byte per voxel (the intensities between their 0.5th
and 99.5th percentiles, the NIfTI scale giving back the original units), every n-th voxel where the
images would otherwise pass :data:`PAGE_IMAGE_BYTES`.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from pipelines.io.writers import atomic_path

__all__ = ["PAGE_IMAGE_BYTES", "VIEWER_DIR", "PageImages", "install_viewer", "page_images", "strided_affine", "viewer_script",
           "with_labels"]

PAGE_IMAGE_BYTES = 9 * 2**20  # the most base64 image data one case page holds
VIEWER_DIR = "_viewer"  # in the run's output folder
VIEWER_FILE = "niivue.umd.js"
NIIVUE_VERSION = "0.69.0"  # as package.json pins it (tests/batch/test_case_page.py holds the two equal)
_NOTICE = (f"niivue.umd.js: NiiVue {NIIVUE_VERSION} (npm @niivue/niivue), BSD-2-Clause licence, "
           "https://github.com/niivue/niivue. Copied here by the batch job for the case pages.\n")


def viewer_script() -> Path | None:
    """NiiVue's browser build: ``$UNET_NIIVUE_JS``, else the project's ``node_modules`` (``make
    web-deps``); None when neither is a file."""
    given = os.environ.get("UNET_NIIVUE_JS")
    path = Path(given) if given else (Path(__file__).resolve().parents[2] / "node_modules" / "@niivue" / "niivue"
                                      / "dist" / VIEWER_FILE)
    return path if path.is_file() else None


def install_viewer(output: Path, script: Path) -> Path:
    """``script`` copied to ``<output>/_viewer/`` with its licence notice, unless an equal copy is
    there (a resumed run). Returns the folder."""
    folder = Path(output) / VIEWER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / VIEWER_FILE
    if not target.is_file() or _digest(target) != _digest(script):
        with atomic_path(target) as tmp:
            shutil.copyfile(script, tmp)
    notice = folder / "NOTICE"
    if not notice.is_file() or notice.read_text() != _NOTICE:
        with atomic_path(notice) as tmp:
            tmp.write_text(_NOTICE)
    return folder


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class PageImages:
    """A page's images, each a gzipped NIfTI in base64 (``name -> text``), and how they were made.

    Attributes:
        images: input key -> its image; ``labels`` the label map; ``diameters`` the RANO diameters
            drawn (1 the longest, 2 the perpendicular), when given.
        steps: every ``steps[i]``-th voxel along axis ``i`` was kept (all 1: every voxel).
        windows: input key -> ``(low, high)``, the values mapped to the 256 levels.
    """

    images: dict[str, str]
    steps: tuple[int, ...]
    windows: dict[str, tuple[float, float]]

    @property
    def size(self) -> int:
        return sum(len(text) for text in self.images.values())

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of a grid of ``shape`` as kept."""
        return tuple(len(range(0, n, step)) for n, step in zip(shape, self.steps))


def _bytes_of(volume: np.ndarray, affine: np.ndarray, scale: tuple[float, float] | None = None) -> bytes:
    image = nib.Nifti1Image(volume, affine)
    image.header.set_data_dtype(np.uint8)
    image.header.set_xyzt_units("mm")
    if scale is not None:
        image.header.set_slope_inter(*scale)
    buffer = io.BytesIO()
    holder = nib.FileHolder(fileobj=buffer)
    image.to_file_map({"image": holder, "header": holder})
    return gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0)


def _window(volume: np.ndarray) -> tuple[float, float]:
    """The 0.5th and 99.5th percentiles of the volume's voxels that differ from its minimum (the
    background), of all voxels when none do."""
    values = volume[volume > volume.min()] if np.any(volume > volume.min()) else volume
    values = values[:: max(1, values.size // 2_000_000)]  # a sample: percentiles of millions are slow
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    return (low, high if high > low else low + 1.0)


def strided_affine(affine: np.ndarray, steps: Sequence[int]) -> np.ndarray:
    """The affine of every ``steps[i]``-th voxel along axis ``i`` of a grid of ``affine``."""
    strided = np.asarray(affine, np.float64).copy()
    strided[:3, :3] = strided[:3, :3] * np.asarray(steps, np.float64)
    return strided


def with_labels(images: PageImages, name: str, volume: np.ndarray, affine: np.ndarray) -> PageImages:
    """``images`` with one more label map, ``volume`` already on their grid (``images.steps`` of the
    grid of ``affine``)."""
    data = _bytes_of(np.asarray(volume).astype(np.uint8), strided_affine(affine, images.steps))
    return PageImages({**images.images, name: base64.b64encode(data).decode("ascii")}, images.steps, images.windows)


def _encode(volumes: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], affine: np.ndarray,
            steps: tuple[int, ...], windows: Mapping[str, tuple[float, float]]) -> PageImages:
    strided = strided_affine(affine, steps)
    cut = tuple(slice(None, None, step) for step in steps)
    out = {}
    for key, volume in volumes.items():
        low, high = windows[key]
        levels = np.clip(np.rint((np.asarray(volume, np.float32)[cut] - low) * (255.0 / (high - low))), 0, 255)
        out[key] = _bytes_of(levels.astype(np.uint8), strided, ((high - low) / 255.0, low))
    for key, volume in labels.items():
        out[key] = _bytes_of(np.asarray(volume)[cut].astype(np.uint8), strided)
    return PageImages({key: base64.b64encode(data).decode("ascii") for key, data in out.items()}, steps, dict(windows))


SLICES_PER_PIXEL = 3  # through-plane gives way first, down to slices this many times the pixels' size


def _coarser(steps: tuple[int, ...], spacing: np.ndarray, through: int, factor: float) -> tuple[int, ...]:
    """``steps`` coarsened until they keep about ``1 / factor`` of the voxels: through-plane
    (``through``) first, until the slices kept are :data:`SLICES_PER_PIXEL` times the pixels' size
    (the in-plane detail is what a reader looks at; 3 to 5 mm slices of 1 mm pixels are a usual
    clinical series); then the finest axis as kept, the in-plane axes together (pixels stay square)."""
    steps = list(steps)
    target = np.prod(steps) * factor
    plane = [axis for axis in range(len(steps)) if axis != through]
    while np.prod(steps) < target:
        kept = spacing * np.asarray(steps)
        if kept[through] * (1 + 1e-6) < SLICES_PER_PIXEL * kept[plane].min():
            steps[through] += 1
            continue
        finest = np.isclose(kept, kept.min(), rtol=0.05)
        for axis in [through] if finest[through] else [a for a in plane if finest[a]]:
            steps[axis] += 1
    return tuple(steps)


def page_images(volumes: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], affine: np.ndarray,
                through: int = 2, budget: int = PAGE_IMAGE_BYTES) -> PageImages:
    """The images of a page: ``volumes`` (input key -> ``(X, Y, Z)`` intensities) and ``labels``
    (name -> ``(X, Y, Z)`` label values below 256), all on one grid of RAS ``affine`` whose axis
    ``through`` is the through-plane one; every voxel when they fit in ``budget`` bytes, else every
    n-th along some axes (:func:`_coarser`).

    Raises:
        ValueError: a label map with values outside 0-255.
    """
    for name, volume in labels.items():
        if volume.size and (volume.min() < 0 or volume.max() > 255):
            raise ValueError(f"case page: the {name} map holds values outside 0-255")
    windows = {key: _window(np.asarray(volume)) for key, volume in volumes.items()}
    spacing = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
    images = _encode(volumes, labels, affine, (1, 1, 1), windows)
    shape = np.shape(next(iter(labels.values())))
    while images.size > budget and any(step < n for step, n in zip(images.steps, shape)):
        # gzip's output shrinks about as the voxel count: coarsen by about the excess at once
        images = _encode(volumes, labels, affine, _coarser(images.steps, spacing, through, images.size / budget),
                         windows)
    return images
