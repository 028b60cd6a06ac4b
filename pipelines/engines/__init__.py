"""Helpers for MONAI's Ignite engines (``SupervisedTrainer``/``SupervisedEvaluator``)."""

from __future__ import annotations

from .checkpoints import ResumeTraining, latest_checkpoint
from pipelines.runtime.distributed import end_process_group  # bundle configs call it from here
from .overlays import ValidationOverlays
from .prepare_batch import PrepareBatchWithWeights
from .tracking import flatten_params, tracked_handlers
from .tuning import tune_membrane_watershed
from .weights import load_pretrained, load_weights, save_weights

__all__ = [
    "PrepareBatchWithWeights",
    "ResumeTraining",
    "ValidationOverlays",
    "end_process_group",
    "flatten_params",
    "latest_checkpoint",
    "load_pretrained",
    "load_weights",
    "save_weights",
    "tracked_handlers",
    "tune_membrane_watershed",
]
