"""Saving and loading network weights without ever leaving a half-written file."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from pipelines.io.weights import mismatched_tensors
from pipelines.io.writers import atomic_path

__all__ = ["load_pretrained", "load_weights", "save_weights"]

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


def load_pretrained(network: torch.nn.Module, path: str | os.PathLike | None, channels: Sequence[str] | None = None,
                    pretrained_channels: Sequence[str] | None = None) -> torch.nn.Module:
    """Start ``network`` from the weights in ``path`` to fine-tune it; ``network`` as it is when
    ``path`` is None.

    ``path`` holds a state dict, or a checkpoint with one under ``model`` (a bundle's ``model.pt``).
    When the network takes other input ``channels`` than the weights were trained on
    (``pretrained_channels``, e.g. FLAIR and T1c out of T1, T1c, T2, FLAIR), the first convolution
    keeps the input weights of those channels, in the network's order; every other tensor must fit
    as it is.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a channel the weights were not trained on, or tensors of other shapes (another
            ``features``); the message names the file, the tensor and both shapes.
    """
    if path is None:
        return network
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    state = dict(state)
    target = getattr(network, "module", network).state_dict()
    if channels is not None and pretrained_channels is not None and list(channels) != list(pretrained_channels):
        unknown = [c for c in channels if c not in pretrained_channels]
        if unknown:
            raise ValueError(f"{path}: trained on the channels {list(pretrained_channels)}, not on {unknown}; "
                             "fine-tune from weights of the same channels or train from scratch")
        first = next(name for name, tensor in target.items() if tensor.ndim >= 3)  # the input convolution
        if state[first].shape[1] != len(pretrained_channels):
            raise ValueError(f"{path}: {first} takes {state[first].shape[1]} input channels, not the "
                             f"{len(pretrained_channels)} of {list(pretrained_channels)}")
        state[first] = state[first][:, [list(pretrained_channels).index(c) for c in channels]].clone()
    differ, _ = mismatched_tensors(state, network)
    if differ:
        raise ValueError(f"{path}: the pretrained weights do not fit the network ({'; '.join(differ[:3])})")
    try:
        getattr(network, "module", network).load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: the pretrained weights do not fit {type(network).__name__}: {exc}") from exc
    logger.info("fine-tuning from %s (input channels %s)", path, list(channels) if channels else "as trained")
    return network
