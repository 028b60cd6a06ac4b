"""Batch preparation for MONAI's Ignite engines."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.engines.utils import PrepareBatch

__all__ = ["PrepareBatchWithWeights"]


class PrepareBatchWithWeights(PrepareBatch):
    """Give the loss a weight map: targets become ``cat([label, weight], dim=1)``, ``(B, 2, *spatial)``.

    Use with :class:`pipelines.losses.WeightedCrossEntropyLoss` as ``prepare_batch`` of MONAI's
    ``SupervisedTrainer``.

    Args:
        image_key: key of the network input.
        label_key: key of the class-index map ``(B, 1, *spatial)``.
        weight_key: key of the weight map ``(B, 1, *spatial)``.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", weight_key: str = "weight") -> None:
        self.image_key = image_key
        self.label_key = label_key
        self.weight_key = weight_key

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [k for k in (self.image_key, self.label_key, self.weight_key) if k not in batchdata]
        if missing:
            raise KeyError(f"PrepareBatchWithWeights: batch has no key(s) {missing}; it has {sorted(batchdata)}")
        image = batchdata[self.image_key]
        label, weight = batchdata[self.label_key], batchdata[self.weight_key]
        if label.shape != weight.shape:
            raise ValueError(
                f"PrepareBatchWithWeights: '{self.weight_key}' {tuple(weight.shape)} must have the shape of "
                f"'{self.label_key}' {tuple(label.shape)}"
            )
        target = torch.cat([torch.as_tensor(label), torch.as_tensor(weight)], dim=1)
        return (
            image.to(device=device, non_blocking=non_blocking, **kwargs),
            target.to(device=device, non_blocking=non_blocking, **kwargs),
        )
