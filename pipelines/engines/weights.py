"""Saving and loading network weights without ever leaving a half-written file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from pipelines.io.writers import atomic_path

__all__ = ["load_weights", "save_weights"]

logger = logging.getLogger(__name__)


def save_weights(network: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write ``network.state_dict()`` (of ``network.module`` for DDP) to ``path`` atomically.

    The file is written next to ``path`` under a temporary name and renamed when complete, so an
    interruption leaves the previous file intact.
    """
    path = Path(path)
    state = getattr(network, "module", network).state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    logger.info("saved weights to %s", path)
    return path


def load_weights(network: torch.nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Load a state dict saved by :func:`save_weights` (``weights_only``: no code runs) into ``network``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a state dict of this network; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable PyTorch weights file ({exc})") from exc
    try:
        getattr(network, "module", network).load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: weights do not fit {type(network).__name__}: {exc}") from exc
    return network
