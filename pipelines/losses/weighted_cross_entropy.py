"""Pixel-wise weighted cross-entropy, the U-Net paper's energy function."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.nn.modules.loss import _Loss

__all__ = ["WeightedCrossEntropyLoss"]


class WeightedCrossEntropyLoss(_Loss):
    """Cross-entropy of logits weighted per pixel by a weight map packed with the target.

    MONAI's trainers call ``loss(pred, target)`` with one target tensor, so the weight map travels as
    the target's second channel (see :class:`pipelines.engines.PrepareBatchWithWeights`).

    Args:
        reduction: ``"mean"`` (sum of weighted pixel losses over the number of pixels, so the scale
            does not depend on the tile size), ``"sum"`` or ``"none"`` (``(B, *spatial)``).

    Shapes:
        input: logits ``(B, C, *spatial)``.
        target: ``(B, 1, *spatial)`` class indices, or ``(B, 2, *spatial)`` class indices then weights.
    """

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"`reduction` must be 'mean', 'sum' or 'none', got {reduction!r}")
        super().__init__(reduction=reduction)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim != input.ndim or target.shape[1] not in (1, 2):
            raise ValueError(
                f"target must have shape (B, 1 or 2, *spatial) for input {tuple(input.shape)}, got {tuple(target.shape)}"
            )
        if target.shape[0] != input.shape[0] or target.shape[2:] != input.shape[2:]:
            raise ValueError(
                f"target must match the input's batch and spatial shape {tuple(input.shape)}, got {tuple(target.shape)}"
            )
        loss = F.cross_entropy(input.float(), target[:, 0].round().long(), reduction="none")
        if target.shape[1] == 2:
            loss = loss * target[:, 1].float()
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss
