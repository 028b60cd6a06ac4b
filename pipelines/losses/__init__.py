"""Loss functions."""

from __future__ import annotations

from .weighted_cross_entropy import WeightedCrossEntropyLoss

__all__ = ["WeightedCrossEntropyLoss"]
