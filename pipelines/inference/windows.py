"""Window geometry shared by the tiled inferers: placement, padded gathering, separable blending weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

__all__ = ["PADDING_MODES", "blend_weights_1d", "even_starts", "gather_window", "mirror_indices"]

PADDING_MODES = ("reflect", "symmetric", "replicate", "constant")


def mirror_indices(length: int, before: int, after: int, mode: str = "reflect") -> torch.Tensor:
    """Source index of every position of an axis of ``length`` padded by ``before`` and ``after``.

    Works for pads of any size (mirroring repeats as often as needed, unlike ``torch.nn.functional.pad``).

    Args:
        mode: ``"reflect"`` (``2 1 | 0 1 2 3 | 2 1``), ``"symmetric"`` (``1 0 | 0 1 2 3 | 3 2``),
            ``"replicate"`` (``0 0 | 0 1 2 3 | 3 3``) or ``"constant"`` (-1 marks padding).
    """
    if mode not in PADDING_MODES:
        raise ValueError(f"`padding_mode` must be one of {PADDING_MODES}, got {mode!r}")
    index = torch.arange(-before, length + after)
    if mode == "constant":
        return torch.where((index >= 0) & (index < length), index, -1)
    if mode == "replicate" or length == 1:
        return index.clamp(0, length - 1)
    if mode == "reflect":
        period = 2 * (length - 1)
        index = index % period
        return torch.where(index >= length, period - index, index)
    period = 2 * length
    index = index % period
    return torch.where(index >= length, period - 1 - index, index)


def gather_window(image: torch.Tensor, starts: Sequence[int], size: Sequence[int], mode: str = "reflect") -> torch.Tensor:
    """The window ``image[:, starts : starts + size]`` of a ``(C, *spatial)`` image, padded where it
    leaves the image (``mode`` as in :func:`mirror_indices`, ``"constant"`` pads with zeros).

    A window inside the image is a view; one that leaves it is gathered in a single copy.
    """
    spatial = image.shape[1:]
    if all(0 <= s and s + n <= length for s, n, length in zip(starts, size, spatial)):
        return image[(slice(None), *(slice(s, s + n) for s, n in zip(starts, size)))]
    ndim = len(spatial)
    indices, masks = [], []
    for axis, (s, n, length) in enumerate(zip(starts, size, spatial)):
        before, after = max(-s, 0), max(s + n - length, 0)
        index = mirror_indices(length, before, after, mode)[s + before : s + before + n].to(image.device)
        shape = [1] * ndim
        shape[axis] = n
        indices.append(index.clamp(min=0).view(shape))
        if mode == "constant":
            masks.append((index >= 0).view(shape))
    window = image[(slice(None), *indices)]
    for mask in masks:
        window = window * mask.to(window.dtype)
    return window


def even_starts(length: int, window: int, overlap: float) -> list[int]:
    """Window starts covering ``[0, length)`` with at least ``overlap`` (a fraction of the window)
    between neighbours, spaced evenly so every region gets the same coverage (nnU-Net's placement)."""
    if length <= window:
        return [0]
    step = window * (1.0 - overlap)
    count = math.ceil((length - window) / step) + 1
    spacing = (length - window) / (count - 1)
    return [int(round(spacing * i)) for i in range(count)]


@lru_cache(maxsize=64)
def _profile(size: int, sigma_scale: float, gaussian: bool) -> tuple[float, ...]:
    if not gaussian:
        return (1.0,) * size
    centre, sigma = (size - 1) / 2.0, max(sigma_scale * size, 1e-6)
    return tuple(math.exp(-((i - centre) ** 2) / (2.0 * sigma**2)) for i in range(size))


def blend_weights_1d(length: int, window: int, starts: Sequence[int], sigma_scale: float, gaussian: bool) -> list[torch.Tensor]:
    """Per window start, the normalised 1D weights ``g(x - s) / N(x)`` over that window (float64).

    ``g`` is a Gaussian of standard deviation ``sigma_scale * window`` centred on the window (or 1
    in constant mode) and ``N(x)`` the sum of ``g`` over every window covering ``x``. Windows lie on
    a grid and the weights are separable, so the product of these per-axis weights is each
    window's share of a voxel: the shares sum to 1, and no normalisation map is ever stored.
    """
    profile = torch.tensor(_profile(window, float(sigma_scale), gaussian), dtype=torch.float64)
    total = torch.zeros(max(length, window), dtype=torch.float64)
    for s in starts:
        total[s : s + window] += profile
    return [profile / total[s : s + window] for s in starts]
