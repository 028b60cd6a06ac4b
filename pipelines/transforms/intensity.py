"""Intensity normalisation by modality: CT Hounsfield windowing or MR z-score within the foreground;
and several MR channels z-scored within the foreground they share."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

logger = logging.getLogger(__name__)

__all__ = ["ChannelsNormalize", "ChannelsNormalized", "ModalityNormalize", "ModalityNormalized"]


def _z_scored(image: torch.Tensor, masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each channel ``c`` minus its mean over ``masks[c]``, divided by its standard deviation there;
    0 outside the mask (and for a channel whose mask is empty)."""
    out = torch.zeros_like(image)
    for c, mask in enumerate(masks):
        if not mask.any():
            continue
        values = image[c][mask]
        std = values.std() if values.numel() > 1 else values.new_tensor(1.0)
        out[c][mask] = (values - values.mean()) / std.clamp_min(1e-6)
    return out


def _differs(channel: torch.Tensor, value: float) -> torch.Tensor:
    """Where ``channel`` differs from ``value`` by more than float rounding (1e-5 of its range: a
    constant background resampled by interpolation stays within it)."""
    tolerance = 1e-5 * max(float(channel.max() - channel.min()), 1e-6)
    return (channel - value).abs() > tolerance


class ModalityNormalize(Transform):
    """Normalise an image ``(C, *spatial)`` as its modality needs.

    - ``"CT"``: clip to ``window`` (Hounsfield units, default soft tissue -160..240) and scale to [0, 1].
    - ``"MR"`` (and anything else with arbitrary units): per channel, subtract the mean and divide by
      the standard deviation of the voxels above ``foreground_threshold`` (the head, not the air);
      the air stays 0 (nnU-Net's non-CT normalisation).

    Returns float32 data of the same shape and metadata.
    """

    def __init__(
        self,
        modality: str = "MR",
        window: Sequence[float] = (-160.0, 240.0),
        foreground_threshold: float = 0.0,
    ) -> None:
        if str(modality).upper() not in ("CT", "MR", "PT", "OTHER"):
            raise ValueError(f"modality must be 'CT', 'MR', 'PT' or 'other', got {modality!r}")
        if len(window) != 2 or window[0] >= window[1]:
            raise ValueError(f"window must be (low, high) with low < high, got {window}")
        self.modality = str(modality).upper()
        self.window = (float(window[0]), float(window[1]))
        self.foreground_threshold = foreground_threshold

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = image.float() if torch.is_tensor(image) else torch.as_tensor(image, dtype=torch.float32)
        if self.modality == "CT":
            low, high = self.window
            return (image.clamp(low, high) - low) / (high - low)
        return _z_scored(image, [image[c] > self.foreground_threshold for c in range(image.shape[0])])


class ModalityNormalized(MapTransform):
    """Dictionary wrapper of :class:`ModalityNormalize`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **options) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalize = ModalityNormalize(**options)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key])
        return d


class ChannelsNormalize(Transform):
    """Z-score each channel of a multi-channel MR image ``(C, *spatial)`` within the brain, the
    foreground the channels share; voxels outside it become 0.

    The foreground, by the first rule that applies (:meth:`foreground`; the rule is logged):

    1. ``mask`` (a brain mask from brain extraction) when given: that mask.
    2. ``"constant background"``: every channel holds one value, its minimum or 0, on at least
       ``min_background`` of its voxels: skull-stripped input, with raw scanner values or already
       normalised by another pipeline (BraTS z-scored within the brain, the background at the
       minimum). The foreground is every voxel where a channel differs from its background value,
       negative values included: the whole brain, never a fraction of it.
    3. ``"relative threshold"``: a magnitude image whose air holds noise: the voxels where the mean
       over channels of ``intensity / (99th percentile of the channel's positive values)`` exceeds
       ``fraction``, so that one dark channel (CSF on FLAIR) or one noisy channel cannot decide alone.

    Rules 2 and 3 do not change when a channel is multiplied by a positive factor (raw scanner
    values of any scale), and rule 2 not when a channel is shifted too; z-scoring already z-scored
    values within the same foreground gives them back. Returns float32 of the same shape.
    """

    def __init__(self, fraction: float = 0.15, min_background: float = 0.05) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"`fraction` must be in (0, 1), got {fraction}")
        if not 0.0 < min_background < 1.0:
            raise ValueError(f"`min_background` must be in (0, 1), got {min_background}")
        self.fraction = fraction
        self.min_background = min_background

    def constant_background(self, image: torch.Tensor) -> list[float] | None:
        """Each channel's constant background value (its minimum or 0, whichever covers at least
        ``min_background`` of the voxels, within float rounding of its range); None unless every
        channel has one."""
        backgrounds = []
        for channel in image.detach().float():
            found = next((value for value in (float(channel.min()), 0.0)
                          if float((~_differs(channel, value)).float().mean()) >= self.min_background), None)
            if found is None:
                return None
            backgrounds.append(found)
        return backgrounds

    def foreground(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The foreground ``(*spatial)`` (bool) of ``image`` ``(C, *spatial)`` by the rules above."""
        array = image.detach().float()
        if mask is not None:
            mask = torch.as_tensor(mask).to(array.device).bool().reshape(-1, *array.shape[1:]).any(0)
            logger.debug("foreground: the brain mask given (%.1f %% of the volume)", 100 * float(mask.float().mean()))
            return mask
        backgrounds = self.constant_background(array)
        if backgrounds is not None:
            differs = torch.stack([_differs(c, b) for c, b in zip(array, backgrounds)]).any(0)
            logger.debug("foreground: constant background %s (%.1f %% of the volume)", backgrounds,
                         100 * float(differs.float().mean()))
            return differs
        relative = torch.zeros_like(array[0])
        for c in range(array.shape[0]):
            values = array[c].cpu().numpy().ravel()
            top = float(np.percentile(values[values > 0], 99)) if (values > 0).any() else 0.0
            if top > 0:
                relative += array[c].clamp_min(0) / top
        logger.debug("foreground: relative threshold %s", self.fraction)
        return (relative / array.shape[0]) > self.fraction

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        image = image.float() if torch.is_tensor(image) else torch.as_tensor(image, dtype=torch.float32)
        return _z_scored(image, [self.foreground(image, mask)] * image.shape[0])


class ChannelsNormalized(MapTransform):
    """Dictionary wrapper of :class:`ChannelsNormalize`; ``mask_key`` names a brain mask in the data
    (``(1, *spatial)`` on the image's grid) used as the foreground when present."""

    def __init__(self, keys: KeysCollection, fraction: float = 0.15, min_background: float = 0.05,
                 mask_key: str | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalize = ChannelsNormalize(fraction, min_background)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key], mask)
        return d
