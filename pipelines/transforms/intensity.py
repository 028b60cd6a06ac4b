"""Intensity normalisation by modality: CT Hounsfield windowing or MR z-score within the foreground;
and several MR channels z-scored within the foreground they share."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

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
    """Z-score each channel of a multi-channel MR image ``(C, *spatial)`` within the foreground the
    channels share; voxels outside it become 0.

    A voxel is foreground where the mean over channels of ``intensity / (99th percentile of that
    channel)`` exceeds ``fraction``: the brain of skull-stripped data (BraTS: the non-zero voxels),
    the head otherwise, but not the background noise of a magnitude image, which one dark channel
    (CSF on FLAIR) or one noisy channel cannot decide alone. Returns float32 of the same shape.
    """

    def __init__(self, fraction: float = 0.15) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"`fraction` must be in (0, 1), got {fraction}")
        self.fraction = fraction

    def foreground(self, image: torch.Tensor) -> torch.Tensor:
        array = image.detach().float()
        relative = torch.zeros_like(array[0])
        for c in range(array.shape[0]):
            values = array[c].cpu().numpy().ravel()
            top = float(np.percentile(values[values > 0], 99)) if (values > 0).any() else 0.0
            if top > 0:
                relative += array[c].clamp_min(0) / top
        return (relative / array.shape[0]) > self.fraction

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = image.float() if torch.is_tensor(image) else torch.as_tensor(image, dtype=torch.float32)
        return _z_scored(image, [self.foreground(image)] * image.shape[0])


class ChannelsNormalized(MapTransform):
    """Dictionary wrapper of :class:`ChannelsNormalize`."""

    def __init__(self, keys: KeysCollection, fraction: float = 0.15, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalize = ChannelsNormalize(fraction)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key])
        return d
