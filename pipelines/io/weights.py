"""Comparing a saved state dict with the network it should load into."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["mismatched_tensors"]


def mismatched_tensors(state: Mapping, network: torch.nn.Module) -> tuple[list[str], list[str]]:
    """What keeps ``state`` from loading into ``network``: ``"<tensor>: <shape> in the weights,
    <shape> in the network"`` for each tensor of another shape, and the network's tensors missing
    from ``state``."""
    expected = getattr(network, "module", network).state_dict()
    differ = [f"{name}: {tuple(state[name].shape)} in the weights, {tuple(tensor.shape)} in the network"
              for name, tensor in expected.items() if name in state and state[name].shape != tensor.shape]
    return differ, [name for name in expected if name not in state]
