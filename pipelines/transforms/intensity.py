"""Intensity normalisation by modality: CT Hounsfield windowing or MR z-score within the foreground."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = ["ModalityNormalize", "ModalityNormalized"]


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
        out = torch.zeros_like(image)
        for c in range(image.shape[0]):
            mask = image[c] > self.foreground_threshold
            if not mask.any():
                continue
            values = image[c][mask]
            std = values.std() if values.numel() > 1 else values.new_tensor(1.0)
            out[c][mask] = (values - values.mean()) / std.clamp_min(1e-6)
        return out


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
