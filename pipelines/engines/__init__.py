"""Helpers for MONAI's Ignite engines (``SupervisedTrainer``/``SupervisedEvaluator``)."""

from __future__ import annotations

from .prepare_batch import PrepareBatchWithWeights
from .tuning import tune_membrane_watershed
from .weights import load_weights, save_weights

__all__ = ["PrepareBatchWithWeights", "load_weights", "save_weights", "tune_membrane_watershed"]
