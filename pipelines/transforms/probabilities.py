"""Post-processing of network outputs: class probabilities mapped back onto a source grid, region
channels turned into one label map."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = ["FillBackground", "FillBackgroundd", "RegionsToLabels", "RegionsToLabelsd"]


class FillBackground(Transform):
    """Give the background channel the probability the others leave: ``p[c] += max(0, 1 - sum(p))``.

    Softmax probabilities inverted through a crop come back zero outside the cropped region (the
    inverse pads zeros); there the image was left out as certain background, and this says so.

    Args:
        channel: the background channel.
    """

    def __init__(self, channel: int = 0) -> None:
        self.channel = channel

    def __call__(self, probabilities: torch.Tensor) -> torch.Tensor:
        if probabilities.ndim < 2 or not 0 <= self.channel < probabilities.shape[0]:
            raise ValueError(f"probabilities must have shape (C, *spatial) with channel {self.channel}, got "
                             f"{tuple(probabilities.shape)}")
        out = probabilities.clone()
        out[self.channel] += (1.0 - probabilities.sum(0)).clamp(min=0.0)
        return out


class FillBackgroundd(MapTransform):
    """Dictionary wrapper of :class:`FillBackground`."""

    def __init__(self, keys: KeysCollection, channel: int = 0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = FillBackground(channel)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class RegionsToLabels(Transform):
    """Region channels (nested, as BraTS' whole tumor, tumor core, enhancing tumor) back to one label
    map ``(1, *spatial)``: each channel over ``threshold`` paints its value, later channels over
    earlier ones (BraTS 2023: values ``[2, 1, 3]`` for WT, TC, ET give edema, necrosis, enhancing).

    Args:
        values: the label value of each channel, in painting order.
        threshold: a channel is on above this (probabilities after a sigmoid: 0.5).
    """

    def __init__(self, values: list[int], threshold: float = 0.5) -> None:
        if not values or any(int(v) < 1 for v in values):
            raise ValueError(f"`values` must be positive label values, one per channel, got {values!r}")
        self.values = [int(v) for v in values]
        self.threshold = threshold

    def __call__(self, regions: torch.Tensor) -> torch.Tensor:
        if regions.ndim < 2 or regions.shape[0] != len(self.values):
            raise ValueError(f"regions must have shape (C, *spatial) with C = {len(self.values)} channels, got "
                             f"{tuple(regions.shape)}")
        labels = torch.zeros_like(regions[:1])
        for channel, value in enumerate(self.values):
            labels[0][regions[channel] > self.threshold] = value
        return labels


class RegionsToLabelsd(MapTransform):
    """Dictionary wrapper of :class:`RegionsToLabels`."""

    def __init__(self, keys: KeysCollection, values: list[int], threshold: float = 0.5,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = RegionsToLabels(values, threshold)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
