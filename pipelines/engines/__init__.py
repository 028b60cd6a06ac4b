"""Helpers for MONAI's Ignite engines (``SupervisedTrainer``/``SupervisedEvaluator``)."""

from __future__ import annotations

from .prepare_batch import PrepareBatchWithWeights
from .weights import load_weights, save_weights

__all__ = ["PrepareBatchWithWeights", "load_weights", "save_weights"]
