"""The U-Net paper's elastic deformation: random displacements on a coarse grid, smoothly interpolated.

"We generate smooth deformations using random displacement vectors on a coarse 3 by 3 grid. The
displacements are sampled from a Gaussian distribution with 10 pixels standard deviation. Per-pixel
displacements are then computed using bicubic interpolation." (Ronneberger et al. 2015). In 3D the
per-voxel field is interpolated trilinearly (PyTorch has no tricubic interpolation).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor, ensure_tuple_rep
from torch.nn import functional as F

__all__ = ["RandCoarseElastic", "RandCoarseElasticd"]

_MODES = ("bilinear", "nearest")
_PADDING_MODES = ("reflection", "border", "zeros")


class RandCoarseElastic(RandomizableTransform):
    """Randomly deform a channel-first image ``(C, *spatial)`` with the paper's coarse-grid elastic field.

    Args:
        prob: probability of deforming.
        grid_size: control points per spatial axis, corners included (paper: 3).
        sigma: standard deviation of the control-point displacements in pixels (paper: 10).
        mode: ``"bilinear"`` for images, ``"nearest"`` for label maps.
        padding_mode: how samples outside the image are filled: ``"reflection"`` (mirror),
            ``"border"`` or ``"zeros"``.
    """

    def __init__(
        self,
        prob: float = 1.0,
        grid_size: int = 3,
        sigma: float = 10.0,
        mode: str = "bilinear",
        padding_mode: str = "reflection",
    ) -> None:
        super().__init__(prob)
        if grid_size < 2:
            raise ValueError(f"`grid_size` must be >= 2, got {grid_size!r}")
        if sigma < 0:
            raise ValueError(f"`sigma` must be >= 0, got {sigma!r}")
        _check_mode(mode, padding_mode)
        self.grid_size = grid_size
        self.sigma = sigma
        self.mode = mode
        self.padding_mode = padding_mode
        self.displacements: np.ndarray | None = None

    def randomize(self, spatial_dims: int) -> None:  # type: ignore[override]
        super().randomize(None)
        if self._do_transform:
            shape = (spatial_dims,) + (self.grid_size,) * spatial_dims
            self.displacements = self.R.normal(0.0, self.sigma, size=shape).astype(np.float32)

    def __call__(self, img, mode: str | None = None, randomize: bool = True):
        spatial_dims = img.ndim - 1
        if spatial_dims not in (2, 3):
            raise ValueError(f"image must have shape (C, *spatial) with 2 or 3 spatial axes, got {tuple(img.shape)}")
        if randomize:
            self.randomize(spatial_dims)
        if not self._do_transform:
            return img
        mode = self.mode if mode is None else mode
        _check_mode(mode, self.padding_mode)
        data = convert_to_tensor(img, track_meta=False)
        grid = _sampling_grid(self.displacements, data.shape[1:], data.device)
        dtype = data.dtype if data.is_floating_point() else torch.float32
        warped = F.grid_sample(
            data[None].to(dtype), grid, mode=mode, padding_mode=self.padding_mode, align_corners=True
        )[0]
        return convert_to_dst_type(warped, img)[0]


def _check_mode(mode: str, padding_mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}")
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"`padding_mode` must be one of {_PADDING_MODES}, got {padding_mode!r}")


def _sampling_grid(displacements: np.ndarray, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``grid_sample`` grid ``(1, *shape, ndim)`` for a coarse displacement field ``(ndim, g, ..., g)`` in pixels."""
    ndim = len(shape)
    coarse = torch.as_tensor(displacements, device=device)[None]
    dense = F.interpolate(coarse, size=shape, mode="bicubic" if ndim == 2 else "trilinear", align_corners=True)[0]
    axes = [torch.linspace(-1.0, 1.0, n, device=device) for n in shape]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=device).view(ndim, *([1] * ndim))
    grid = identity + dense * scale  # (ndim, *shape), axis order of the array
    # grid_sample wants the last dimension ordered (x, y[, z]) = last array axis first
    return grid.flip(0).permute(*range(1, ndim + 1), 0)[None]


class RandCoarseElasticd(RandomizableTransform, MapTransform):
    """Dictionary wrapper of :class:`RandCoarseElastic`: one random field deforms every key alike.

    The other arguments: see :class:`RandCoarseElastic`.

    Args:
        keys: keys to deform, e.g. ``["image", "label", "weight"]``.
        mode: interpolation per key (``"bilinear"`` for images and weight maps, ``"nearest"`` for labels).
        allow_missing_keys: skip missing keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 1.0,
        grid_size: int = 3,
        sigma: float = 10.0,
        mode: str | list[str] | tuple[str, ...] = "bilinear",
        padding_mode: str = "reflection",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.elastic = RandCoarseElastic(1.0, grid_size, sigma, self.mode[0], padding_mode)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.elastic.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        self.randomize(None)
        first = next(self.key_iterator(d), None)
        if not self._do_transform or first is None:
            return d
        self.elastic.randomize(d[first].ndim - 1)
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.elastic(d[key], mode=mode, randomize=False)
        return d
