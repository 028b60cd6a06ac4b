"""Brain extraction for whole-head MR studies, as a step of a bundle's preprocessing.

The mask comes from deepbet (Fisch et al., 2024; MIT licence): two small 3D networks, a bounding box
then the brain, trained on T1-weighted heads of many scanners, whose TorchScript weights ship inside
its PyPI wheel (nothing is fetched at run time). Why it and not HD-BET, ROBEX, BET ports or atlas
registration, and its figures on real heads: ``docs/benchmarks.md``.

Input already skull-stripped is left as it is: :class:`ExtractBraind` tells it by a constant
background (BraTS and the public glioma data sets) or, for a magnitude image whose air holds noise,
by the brain found covering nearly all of the head.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Hashable, Mapping, Sequence
from importlib.metadata import version

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from pipelines.transforms.intensity import ChannelsNormalize

__all__ = ["BrainExtractionError", "ExtractBraind", "brain_mask"]

logger = logging.getLogger(__name__)

MODES = ("auto", "always", "never")


class BrainExtractionError(ValueError):
    """No brain found in a volume (an empty image, not a head)."""


@functools.cache
def _extractor():
    # deepbet loads pandas and two TorchScript networks: only for a study that needs extraction
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=True)


def method() -> str:
    """The method's name and version, for the record."""
    return f"deepbet {version('deepbet')}"


def brain_mask(volume: np.ndarray, affine: np.ndarray, threshold: float = 0.5, source: str = "volume") -> np.ndarray:
    """The brain of a T1-weighted head ``volume`` ``(X, Y, Z)`` on its ``affine`` (any orientation).

    Returns:
        bool ``(X, Y, Z)``: the brain (largest connected component, holes filled), on the same grid.

    Raises:
        BrainExtractionError: nothing like a brain in ``volume`` (the message names ``source``).
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"{source}: brain extraction takes a 3D volume, got shape {volume.shape}")
    if not np.isfinite(volume).all() or float(volume.max()) <= float(volume.min()):
        raise BrainExtractionError(f"{source}: no brain to extract (the volume is constant or not finite)")
    try:
        _, mask, _ = _extractor().run(nib.Nifti1Image(volume, np.asarray(affine, dtype=np.float64)),
                                      threshold=threshold)
    except (AssertionError, ValueError) as exc:  # deepbet asserts on a volume with no foreground
        raise BrainExtractionError(f"{source}: no brain found by {method()} ({exc})") from exc
    mask = np.asarray(mask.dataobj).astype(bool)
    if not mask.any():
        raise BrainExtractionError(f"{source}: no brain found by {method()}")
    return mask


class ExtractBraind(MapTransform):
    """The brain mask of a stacked multi-channel MR image, under ``mask_key``.

    ``mode``: ``"auto"`` uses the brain mask for a whole head only: not for input skull-stripped
    already, which is every channel on one constant background
    (:meth:`ChannelsNormalize.constant_background` with ``min_background``, the bundle's
    normalisation's; no extraction run), or the brain found covering
    at least ``min_coverage`` of the head (the bright voxels above the air's noise); ``"always"``
    uses the mask; ``"never"`` runs nothing. The mask is computed on the first of ``prefer`` among
    ``channels`` (deepbet reads T1-weighted images), else on channel 0, and lies on the image's
    grid: ``(1, *spatial)`` uint8 with the image's affine, also under ``<mask_key>_native`` (the same
    object: later transforms that resample ``mask_key`` leave it on the grid it was found on, for the
    batch job's ``brain_mask.nii.gz``). What was found goes under ``<mask_key>_extraction`` (method,
    channel, brain and head volumes in mL, coverage, used or why not).

    Args:
        keys: the stacked image (one key).
        channels: the image's channel names, in order.
    """

    def __init__(self, keys: KeysCollection, channels: Sequence[str], mask_key: str = "brain_mask",
                 mode: str | bool = "auto", prefer: Sequence[str] = ("t1n", "t1c"), threshold: float = 0.5,
                 min_coverage: float = 0.9, min_background: float = 0.05, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        mode = {True: "always", False: "never"}.get(mode, mode) if isinstance(mode, bool) else mode
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES} (or true/false), got {mode!r}")
        if not 0.0 < min_coverage <= 1.0:
            raise ValueError(f"`min_coverage` must be in (0, 1], got {min_coverage}")
        self.mode, self.mask_key, self.threshold, self.min_coverage = mode, mask_key, threshold, min_coverage
        self.normalize = ChannelsNormalize(min_background=min_background)  # its rules tell the background
        self.channels = [str(c) for c in channels]
        self.channel = next((c for c in prefer if c in self.channels), self.channels[0] if self.channels else None)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            report, mask = self._extract(image, str(getattr(image, "meta", {}).get("filename_or_obj", key)))
            d[f"{self.mask_key}_extraction"] = report
            if mask is not None:
                meta = dict(getattr(image, "meta", {}))
                d[self.mask_key] = d[f"{self.mask_key}_native"] = MetaTensor(
                    torch.from_numpy(mask[None].astype(np.uint8)), meta=meta)
        return d

    def _extract(self, image, source: str) -> tuple[dict, np.ndarray | None]:
        """What was found (for the record) and the mask to use (None: none)."""
        if self.mode == "never":
            return {"used": False, "why": "brain extraction off (mode 'never')"}, None
        array = torch.as_tensor(image).detach().float()
        if self.mode == "auto" and self.normalize.constant_background(array) is not None:
            return {"used": False, "why": "skull-stripped input: every channel on one constant background"}, None
        index = self.channels.index(self.channel) if self.channel in self.channels else 0
        affine = np.asarray(image.affine, dtype=np.float64) if isinstance(image, MetaTensor) else np.eye(4)
        mask = brain_mask(array[index].cpu().numpy(), affine, self.threshold, source)
        head = self.normalize.foreground(array).cpu().numpy()
        coverage = float((mask & head).sum() / max(int(head.sum()), 1))
        voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
        report = {"method": method(), "channel": self.channel or str(index),
                  "brain_ml": round(float(mask.sum()) * voxel_ml, 1), "head_ml": round(float(head.sum()) * voxel_ml, 1),
                  "coverage": round(coverage, 4), "used": True}
        if self.mode == "auto" and coverage >= self.min_coverage:
            report.update(used=False, why=f"brain-only input: the brain found covers {coverage:.0%} of the head "
                                          f"(at least {self.min_coverage:.0%})")
            return report, None
        logger.debug("%s: brain extracted from %s: %s", source, report["channel"], report)
        return report, mask
