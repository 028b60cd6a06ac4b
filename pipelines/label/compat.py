"""MONAI Label 0.8.5 on the CPU build of torch: the two ``torchvision.utils`` functions it imports.

``monailabel.transform.post`` (which ``monailabel.tasks.infer.bundle`` imports for ``Restored``)
does ``from torchvision.utils import make_grid, save_image`` at module level, for 2D dump
transforms that the bundles served here never run. PyPI's torchvision wheels are built against
the CUDA torch and do not load with the CPU build (their extension needs ``libc10_cuda.so``), and
there is no CPU torchvision to install. :func:`provide_torchvision_utils` registers a
``torchvision.utils`` module with working CPU versions of those two functions, only when the real
torchvision cannot be imported, and only in the process that calls it (the MONAI Label server).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import types

import numpy as np
import torch

__all__ = ["make_grid", "provide_torchvision_utils", "save_image"]

logger = logging.getLogger(__name__)


def make_grid(
    tensor: torch.Tensor | list[torch.Tensor],
    nrow: int = 8,
    padding: int = 2,
    normalize: bool = False,
    value_range: tuple[float, float] | None = None,
    scale_each: bool = False,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Images ``(B, C, H, W)`` (or a list of ``(C, H, W)``) tiled into one ``(3, H', W')`` grid.

    Same contract as ``torchvision.utils.make_grid``: ``nrow`` images per row, ``padding`` pixels
    of ``pad_value`` around each; 2D input is one image, ``(H, W)``; one channel is repeated to
    three; ``normalize`` shifts each image (``scale_each``) or the batch to [0, 1] over
    ``value_range`` (default: its min and max).
    """
    if isinstance(tensor, list):
        tensor = torch.stack(tensor)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a tensor or a list of tensors, got {type(tensor).__name__}")
    if tensor.dim() == 2:
        tensor = tensor[None]
    if tensor.dim() == 3:
        tensor = tensor[None] if tensor.shape[0] in (1, 3) else tensor[:, None]
    if tensor.dim() != 4:
        raise ValueError(f"tensor must be (B, C, H, W), (C, H, W) or (H, W), got shape {tuple(tensor.shape)}")
    if tensor.shape[1] == 1:
        tensor = tensor.repeat(1, 3, 1, 1)
    tensor = tensor.clone().float() if normalize else tensor

    def normalise(image: torch.Tensor, low: float, high: float) -> None:
        image.clamp_(min=low, max=high).sub_(low).div_(max(high - low, 1e-5))

    if normalize:
        if scale_each:
            for image in tensor:
                low, high = value_range or (float(image.min()), float(image.max()))
                normalise(image, low, high)
        else:
            low, high = value_range or (float(tensor.min()), float(tensor.max()))
            normalise(tensor, low, high)
    if tensor.shape[0] == 1:
        return tensor[0]
    count = tensor.shape[0]
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    height, width = tensor.shape[2] + padding, tensor.shape[3] + padding
    grid = tensor.new_full((tensor.shape[1], height * rows + padding, width * columns + padding), pad_value)
    for k in range(count):
        y, x = divmod(k, columns)
        grid[:, y * height + padding : (y + 1) * height, x * width + padding : (x + 1) * width] = tensor[k]
    return grid


def save_image(tensor: torch.Tensor | list[torch.Tensor], fp: str | os.PathLike, format: str | None = None, **kwargs) -> None:
    """Write :func:`make_grid` of ``tensor`` (values in [0, 1]) as an 8-bit picture, as torchvision does."""
    from PIL import Image

    grid = make_grid(tensor, **kwargs)
    array = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    Image.fromarray(np.ascontiguousarray(array)).save(fp, format=format)


def provide_torchvision_utils() -> bool:
    """Make ``from torchvision.utils import make_grid, save_image`` work; True if this module had to provide them.

    Does nothing when the real torchvision imports. Otherwise removes what a failed import left in
    ``sys.modules`` and registers a ``torchvision`` package holding only ``utils``; other
    torchvision modules stay unimportable, so code that needs them still fails at its import.
    """
    try:
        import torchvision.utils  # noqa: F401
    except Exception as exc:  # a CUDA-built wheel raises RuntimeError/OSError, not only ImportError
        reason = f"{type(exc).__name__}: {exc}"
    else:
        return False
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    package = types.ModuleType("torchvision", "CPU stand-in: only torchvision.utils.make_grid/save_image")
    package.__path__ = []  # a package, so `import torchvision.utils` resolves through sys.modules
    utils = types.ModuleType("torchvision.utils")
    utils.make_grid, utils.save_image = make_grid, save_image
    package.utils = utils
    sys.modules["torchvision"], sys.modules["torchvision.utils"] = package, utils
    logger.info("torchvision is not importable (%s); providing torchvision.utils.make_grid/save_image", reason)
    return True
