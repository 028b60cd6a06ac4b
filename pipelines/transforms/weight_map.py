"""The U-Net paper's loss weight map: class balance plus a border term between touching cells.

``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x)) ** 2 / (2 * sigma ** 2))``, with ``d1`` and ``d2`` the
distances to the nearest and the second nearest cell (Ronneberger et al. 2015, eq. 2). The border
term is given to background pixels (the membranes separating cells); cell pixels keep ``w_c``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_numpy, ensure_tuple_rep
from scipy import ndimage

__all__ = ["UNetWeightMap", "UNetWeightMapd", "unet_weight_map"]

# Border-term contributions below w0 * _NEGLIGIBLE are dropped, which lets each cell's distance
# transform run on its bounding box grown by the cut-off distance instead of on the whole image.
_NEGLIGIBLE = 1e-8


def unet_weight_map(
    label: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    foreground: int = 1,
    class_weights: Sequence[float] | None = None,
    connectivity: int = 1,
) -> np.ndarray:
    """Weight map for a class map without channel axis ``(*spatial)``.

    Args:
        label: class indices; pixels equal to ``foreground`` are cells, every other value is background.
        w0: amplitude of the border term (paper: 10).
        sigma: width of the border term in pixels (paper: 5).
        foreground: the cell class.
        class_weights: ``(background, foreground)`` weights ``w_c``. None balances the classes of
            this image: ``w_c(k) = n / (K * n_k)`` over the ``K`` classes present, so each class
            carries the same total weight (an image of one class gets weight 1 everywhere).
        connectivity: cells are connected components of the foreground under this connectivity
            (1: 4-connected in 2D, 6-connected in 3D; ``label.ndim``: 8- or 26-connected).

    Returns:
        float32 array of the shape of ``label``.
    """
    if w0 < 0 or sigma <= 0:
        raise ValueError(f"`w0` must be >= 0 and `sigma` > 0, got w0={w0!r}, sigma={sigma!r}")
    cells = np.asarray(label) == foreground
    if class_weights is None:
        n_fg = int(cells.sum())
        n_bg = cells.size - n_fg
        present = (n_fg > 0) + (n_bg > 0)
        w_bg = cells.size / (present * n_bg) if n_bg else 1.0
        w_fg = cells.size / (present * n_fg) if n_fg else 1.0
    else:
        if len(class_weights) != 2:
            raise ValueError(f"`class_weights` must be (background, foreground), got {class_weights!r}")
        w_bg, w_fg = (float(w) for w in class_weights)
    weight = np.where(cells, np.float32(w_fg), np.float32(w_bg))
    if w0 == 0:
        return weight

    structure = ndimage.generate_binary_structure(cells.ndim, connectivity)
    components, count = ndimage.label(cells, structure=structure)
    if count < 2:
        return weight
    cutoff = sigma * math.sqrt(2.0 * math.log(1.0 / _NEGLIGIBLE))
    margin = int(math.ceil(cutoff))
    d1 = np.full(cells.shape, np.inf, dtype=np.float32)
    d2 = np.full(cells.shape, np.inf, dtype=np.float32)
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        window = tuple(
            slice(max(s.start - margin, 0), min(s.stop + margin, size)) for s, size in zip(box, cells.shape)
        )
        distance = ndimage.distance_transform_edt(components[window] != index).astype(np.float32)
        near1, near2 = d1[window], d2[window]
        np.minimum(near2, np.maximum(near1, distance), out=near2)
        np.minimum(near1, distance, out=near1)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    weight += np.where(cells, 0.0, border).astype(np.float32)
    return weight


class UNetWeightMap(Transform):
    """Array transform: channel-first class map ``(1, *spatial)`` to its weight map ``(1, *spatial)``.

    Args: see :func:`unet_weight_map`.
    """

    def __init__(
        self,
        w0: float = 10.0,
        sigma: float = 5.0,
        foreground: int = 1,
        class_weights: Sequence[float] | None = None,
        connectivity: int = 1,
    ) -> None:
        self.kwargs = {
            "w0": w0,
            "sigma": sigma,
            "foreground": foreground,
            "class_weights": class_weights,
            "connectivity": connectivity,
        }

    def __call__(self, label):
        array = convert_to_numpy(label)
        if array.ndim < 3 or array.shape[0] != 1:
            raise ValueError(f"label must have shape (1, *spatial) with 2 or 3 spatial axes, got {array.shape}")
        weight = unet_weight_map(np.rint(array[0]).astype(np.int64), **self.kwargs)[None]
        return convert_to_dst_type(weight, label, dtype=np.float32)[0]


class UNetWeightMapd(MapTransform):
    """Dictionary wrapper of :class:`UNetWeightMap`: writes the weight map of ``keys`` to ``weight_keys``.

    The other arguments: see :func:`unet_weight_map`.

    Args:
        keys: class-map keys, e.g. ``"label"``.
        weight_keys: output key(s), one per key (default ``"weight"``).
        allow_missing_keys: skip missing keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        weight_keys: KeysCollection = "weight",
        w0: float = 10.0,
        sigma: float = 5.0,
        foreground: int = 1,
        class_weights: Sequence[float] | None = None,
        connectivity: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.weight_keys = ensure_tuple_rep(weight_keys, len(self.keys))
        self.weight_map = UNetWeightMap(w0, sigma, foreground, class_weights, connectivity)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key, weight_key in self.key_iterator(d, self.weight_keys):
            d[weight_key] = self.weight_map(d[key])
        return d
