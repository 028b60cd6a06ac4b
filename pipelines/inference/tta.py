"""Test-time augmentation: average an inferer's output over flips and rotations of the input.

The U-Net paper's ISBI result averages "over 7 rotated versions of the input data" (8 in all);
nnU-Net mirrors along every axis. Each transform is undone on the output before averaging, so a
network that commutes with the transforms gives exactly its plain output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type

__all__ = ["TTAInferer", "tta_transforms"]

_MODES = ("mirror", "dihedral")
Transform = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def tta_transforms(mode: str, axes: Sequence[int]) -> list[Transform]:
    """(forward, inverse) pairs on tensors ``(B, C, *spatial)``; ``axes`` index the spatial axes.

    ``"mirror"``: every subset of ``axes`` flipped (``2 ** len(axes)`` transforms).
    ``"dihedral"``: the 8 symmetries of the square in the plane of the two ``axes``
    (rotations by 0, 90, 180, 270 degrees, each with and without a flip).
    """
    dims = [a + 2 for a in axes]
    if mode == "mirror":
        subsets = [list(c) for n in range(len(dims) + 1) for c in combinations(dims, n)]
        return [((lambda x, s=s: x.flip(s) if s else x), (lambda y, s=s: y.flip(s) if s else y)) for s in subsets]
    if mode == "dihedral":
        if len(dims) != 2:
            raise ValueError(f"`axes` must name 2 spatial axes for mode 'dihedral', got {tuple(axes)}")
        pairs = []
        for flip in (False, True):
            for k in range(4):
                pairs.append((
                    lambda x, k=k, f=flip: torch.rot90(x.flip(dims[0]) if f else x, k, dims),
                    lambda y, k=k, f=flip: (lambda r: r.flip(dims[0]) if f else r)(torch.rot90(y, -k, dims)),
                ))
        return pairs
    raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}")


class TTAInferer(Inferer):
    """Wrap an inferer: run it on each flipped/rotated input, undo the transform, average the outputs.

    Args:
        inferer: the inferer to wrap (e.g. :class:`OverlapTileInferer`).
        mode: ``"mirror"`` or ``"dihedral"`` (see :func:`tta_transforms`).
        axes: spatial axes to transform; default all for ``"mirror"``, the first two for ``"dihedral"``.

    The outputs (logits) are averaged; apply softmax or sigmoid afterwards as usual.
    """

    def __init__(self, inferer: Inferer, mode: str = "mirror", axes: Sequence[int] | None = None) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}")
        self.inferer = inferer
        self.mode = mode
        self.axes = None if axes is None else tuple(axes)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        spatial = inputs.ndim - 2
        axes = self.axes if self.axes is not None else tuple(range(spatial if self.mode == "mirror" else 2))
        if any(not 0 <= a < spatial for a in axes):
            raise ValueError(f"`axes` must index the {spatial} spatial axes, got {axes}")
        data = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        transforms = tta_transforms(self.mode, axes)
        total = None
        for forward, inverse in transforms:
            output = self.inferer(forward(data), network, *args, **kwargs)
            output = inverse(output.as_tensor() if isinstance(output, MetaTensor) else output)
            total = output if total is None else total + output
        total = total / len(transforms)
        if isinstance(inputs, MetaTensor):
            return convert_to_dst_type(total, inputs, dtype=total.dtype)[0]
        return total
