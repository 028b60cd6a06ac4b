"""The U-Net of Ronneberger et al. (MICCAI 2015), in 2D and 3D, valid or same padding.

The paper's network is ``UNet(2, 1, 2)``: unpadded ("valid") 3x3 convolutions, 2x2 max pooling,
2x2 up-convolutions that halve the channels, copy-and-crop concatenation skips and a final 1x1
convolution; 572x572 in, 388x388 out, 31,030,658 parameters. ``padding="same"`` with a
normalisation is the variant most modern work uses (nnU-Net, MONAI's BasicUNet).

Every layer is a plain ``torch.nn`` layer from MONAI's factories; faster CPU inference kernels are
swapped in by :func:`pipelines.networks.cpu.for_cpu_inference` (our inferers do it by themselves).
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional

import torch
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn
from torch.nn import functional as F

__all__ = ["UNet"]

# Project defaults for the string shortcuts; a (name, kwargs) tuple is passed to MONAI unchanged.
_ACT_SHORTCUTS: dict[str, tuple[str, dict]] = {
    "relu": ("relu", {"inplace": True}),
    "leakyrelu": ("leakyrelu", {"negative_slope": 0.2, "inplace": True}),
    "prelu": ("prelu", {}),
}
_NORM_NAMES = ("batch", "instance", "group")
_GROUPS = 8  # default number of groups for norm="group" (reduced to a divisor of the channels)
_PADDINGS = ("valid", "same")
_UP_MODES = ("transpose", "upsample")
_SKIPS = ("concat", "sum")


def _norm_args(norm: str | tuple | None, channels: int) -> tuple | None:
    """Resolve ``norm`` to MONAI's ``(name, kwargs)`` form for a layer with ``channels`` channels."""
    if norm is None:
        return None
    if isinstance(norm, str):
        name, kwargs = norm.lower(), {}
    elif isinstance(norm, (tuple, list)) and len(norm) == 2 and isinstance(norm[1], dict):
        name, kwargs = str(norm[0]).lower(), dict(norm[1])
    else:
        raise TypeError(f"`norm` must be None, a name or a (name, kwargs) pair, got {norm!r}")
    if name not in _NORM_NAMES:
        raise ValueError(f"`norm` must be one of {_NORM_NAMES} or None, got {name!r}")
    if name == "instance":
        kwargs.setdefault("affine", True)
    if name == "group":
        kwargs.setdefault("num_groups", math.gcd(_GROUPS, channels))
    return name, kwargs


def _act_args(act: str | tuple) -> tuple:
    if isinstance(act, str):
        if act.lower() not in _ACT_SHORTCUTS:
            raise ValueError(f"`act` must be one of {tuple(_ACT_SHORTCUTS)} or a (name, kwargs) pair, got {act!r}")
        return _ACT_SHORTCUTS[act.lower()]
    if isinstance(act, (tuple, list)) and len(act) == 2 and isinstance(act[1], dict):
        return str(act[0]), dict(act[1])
    raise TypeError(f"`act` must be a name or a (name, kwargs) pair, got {act!r}")


def _center_crop(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Crop the spatial dimensions of ``x`` ``(B, C, *spatial)`` to ``size``, centred (copy and crop)."""
    for axis in range(len(size)):
        have, want = x.shape[axis + 2], size[axis]
        x = x.narrow(axis + 2, (have - want) // 2, want)
    return x


class _DoubleConv(nn.Sequential):
    """Two 3x3(x3) convolutions, each followed by the optional normalisation and the activation."""

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, padding: str, norm, act: tuple
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, channels in enumerate((in_channels, out_channels), start=1):
            layers[f"conv{i}"] = Conv["conv", spatial_dims](
                channels, out_channels, kernel_size=3, padding=1 if padding == "same" else 0, bias=norm is None
            )
            if norm is not None:
                layers[f"norm{i}"] = get_norm_layer(_norm_args(norm, out_channels), spatial_dims, out_channels)
            layers[f"act{i}"] = get_act_layer(act)
        super().__init__(layers)


class _Up(nn.Module):
    """Up-sample by 2 to ``skip_channels``, merge the centre-cropped skip features, two convolutions.

    ``up_mode="transpose"`` is the paper's 2x2 up-convolution. ``"upsample"`` is nearest-neighbour
    interpolation then a 1x1 convolution (run before the interpolation, which gives the same result
    at a quarter (2D) or eighth (3D) of the cost). Nearest-neighbour keeps the valid network
    shift-equivariant, so overlap-tile inference stays exact; linear interpolation would make border
    pixels depend on where a tile ends.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        padding: str,
        norm,
        act: tuple,
        up_mode: str,
        skip: str,
    ) -> None:
        super().__init__()
        if up_mode == "transpose":
            self.up = Conv["convtrans", spatial_dims](in_channels, skip_channels, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                Conv["conv", spatial_dims](in_channels, skip_channels, kernel_size=1),
                nn.Upsample(scale_factor=2, mode="nearest"),
            )
        self.skip = skip
        merged = 2 * skip_channels if skip == "concat" else skip_channels
        self.convs = _DoubleConv(spatial_dims, merged, skip_channels, padding, norm, act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        skip = _center_crop(skip, list(x.shape[2:]))
        x = torch.cat([skip, x], dim=1) if self.skip == "concat" else x + skip
        return self.convs(x)


class UNet(nn.Module):
    """U-Net with valid (paper) or same padding, for 2D and 3D inputs.

    Each of the ``len(features)`` levels has two 3x3(x3) convolutions, each followed by the optional
    normalisation and the activation; the contracting path goes down with 2x2(x2) max pooling,
    ``dropout`` acts at its end (the paper's "drop-out layers at the end of the contracting path").
    The expanding path up-samples by 2 to the channels of the level below (the paper's up-convolution
    halves them), merges the skip features and runs two convolutions; a 1x1 convolution gives
    ``out_channels`` logits. No activation follows: softmax or sigmoid belong to post-processing.

    ``padding="valid"`` uses unpadded convolutions and centre-crops the skip features to the
    up-sampled size (copy and crop): the output is smaller than the input, by the network's context,
    and only some input sizes are possible (see :meth:`valid_input_shape`). ``padding="same"`` keeps
    every size: the input is zero-padded to a multiple of ``2 ** (len(features) - 1)`` and the output
    cropped back.

    Weights follow the paper: Gaussian with standard deviation ``sqrt(2 / N)``, ``N`` the number of
    inputs of one unit; biases zero.

    Args:
        spatial_dims: 2 or 3.
        in_channels: number of input channels.
        out_channels: number of output channels (logits).
        features: channels of each level, top to bottom; ``len(features) - 1`` poolings.
        padding: ``"valid"`` (paper) or ``"same"``.
        norm: None (paper), ``"batch"``, ``"instance"`` (affine), ``"group"`` (8 groups, or fewer
            where the channels are not divisible) or a MONAI ``(name, kwargs)`` pair such as
            ``("group", {"num_groups": 4})``. Convolutions followed by a normalisation have no bias.
        act: ``"relu"`` (paper), ``"leakyrelu"`` (slope 0.2), ``"prelu"`` or a ``(name, kwargs)`` pair.
        dropout: dropout probability at the end of the contracting path.
        up_mode: ``"transpose"`` (paper, 2x2 up-convolution) or ``"upsample"`` (nearest-neighbour
            interpolation and a 1x1 convolution).
        skip: ``"concat"`` (paper) or ``"sum"``.

    Example:
        >>> net = UNet(2, 1, 2)
        >>> net(torch.zeros(1, 1, 572, 572)).shape
        torch.Size([1, 2, 388, 388])
    """

    __jit_unused_properties__ = ["downsample_factor"]  # noqa: RUF012 - TorchScript reads this name

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (64, 128, 256, 512, 1024),
        padding: str = "valid",
        norm: str | tuple | None = None,
        act: str | tuple = "relu",
        dropout: float = 0.0,
        up_mode: str = "transpose",
        skip: str = "concat",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"`spatial_dims` must be 2 or 3, got {spatial_dims!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        features = tuple(features)
        if len(features) < 2 or not all(isinstance(f, int) and f > 0 for f in features):
            raise ValueError(f"`features` must hold at least two positive integers, got {features!r}")
        for name, value, allowed in (
            ("padding", padding, _PADDINGS),
            ("up_mode", up_mode, _UP_MODES),
            ("skip", skip, _SKIPS),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
        _norm_args(norm, features[0])  # validate early, with the user's value in the message
        act_args = _act_args(act)

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.padding = padding
        self.depth = len(features) - 1

        self.encoder = nn.ModuleList()
        for level, channels in enumerate(features):
            previous = in_channels if level == 0 else features[level - 1]
            self.encoder.append(_DoubleConv(spatial_dims, previous, channels, padding, norm, act_args))
        self.pool = Pool["max", spatial_dims](kernel_size=2, stride=2)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.decoder = nn.ModuleList(
            _Up(spatial_dims, features[level + 1], features[level], padding, norm, act_args, up_mode, skip)
            for level in reversed(range(self.depth))
        )
        self.head = Conv["conv", spatial_dims](features[0], out_channels, kernel_size=1)
        self._init_weights()

    @property
    def downsample_factor(self) -> int:
        """``2 ** depth``: the network is shift-equivariant for shifts by multiples of this."""
        return 2**self.depth

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                fan_in = module.in_channels * math.prod(module.kernel_size)
            elif isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                # kernel == stride: each output unit sees one kernel tap of every input channel
                fan_in = module.in_channels
            else:
                continue
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_in))
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # ---- shape arithmetic -------------------------------------------------------------------
    def _valid_output_1d(self, size: int) -> Optional[int]:  # noqa: UP045 - TorchScript reads no `int | None`
        """Output size along one axis for a valid network, or None when ``size`` is impossible."""
        for _ in range(self.depth):
            size -= 4
            if size < 2 or size % 2:
                return None
            size = size // 2
        size -= 4
        if size < 1:
            return None
        for _ in range(self.depth):
            size = 2 * size - 4
            if size < 1:
                return None
        return size

    def _check_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != self.spatial_dims:
            raise ValueError(f"spatial shape must have {self.spatial_dims} sizes, got {tuple(input_shape)!r}")
        return shape

    def _nearest_valid(self, size: int) -> tuple[int | None, int | None]:
        below = next((n for n in range(size - 1, 0, -1) if self._valid_output_1d(n) is not None), None)
        above = next(n for n in itertools.count(size + 1) if self._valid_output_1d(n) is not None)
        return below, above

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial output shape for a spatial input shape.

        Raises:
            ValueError: for a valid network, when a size cannot pass through it; the message names
                the nearest possible sizes.
        """
        shape = self._check_shape(input_shape)
        if self.padding == "same":
            return shape
        out = []
        for axis, size in enumerate(shape):
            result = self._valid_output_1d(size)
            if result is None:
                below, above = self._nearest_valid(size)
                nearest = f"{below} or {above}" if below else f"{above}"
                raise ValueError(
                    f"input size {size} along spatial axis {axis} does not fit this valid U-Net "
                    f"(every pooling needs an even size); nearest valid sizes: {nearest}"
                )
            out.append(result)
        return tuple(out)

    def valid_input_shape(self, min_output_shape: Sequence[int]) -> tuple[int, ...]:
        """Smallest input shape whose output covers ``min_output_shape`` and whose poolings see even sizes.

        For ``padding="same"`` this is ``min_output_shape`` rounded up to a multiple of
        :attr:`downsample_factor`, the smallest size that needs no internal padding.
        """
        shape = self._check_shape(min_output_shape)
        if any(s < 1 for s in shape):
            raise ValueError(f"`min_output_shape` must be positive, got {tuple(min_output_shape)!r}")
        factor = self.downsample_factor
        if self.padding == "same":
            return tuple(-(-s // factor) * factor for s in shape)
        result = []
        for want in shape:
            size = want
            while (out := self._valid_output_1d(size)) is None or out < want:
                size += 1
            result.append(size)
        return tuple(result)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, out_channels, *output_shape)`` for an input ``(B, in_channels, *spatial)``."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"input must have shape (B, C, *spatial) with {self.spatial_dims} spatial axes, "
                f"got {list(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input must have {self.in_channels} channels, got {x.shape[1]}")
        spatial = list(x.shape[2:])
        if self.padding == "valid":
            if torch.jit.is_scripting():  # TorchScript (ckpt_export): the sizes only
                for size in spatial:
                    if self._valid_output_1d(size) is None:
                        raise ValueError("an input size does not fit this valid U-Net (every pooling needs an even size)")
            else:
                self._check_valid(spatial)  # raises with the nearest valid sizes
        else:
            factor = int(2**self.depth)
            flat: list[int] = []  # F.pad takes (last axis low, last axis high, ...)
            for size in spatial[::-1]:
                total = (-size) % factor
                flat += [total // 2, total - total // 2]
            if max(flat) > 0:
                x = F.pad(x, flat)

        skips: list[torch.Tensor] = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        x = self.dropout(skips.pop())
        for up in self.decoder:
            x = up(x, skips.pop())
        x = self.head(x)
        if self.padding == "same" and list(x.shape[2:]) != spatial:
            x = _center_crop(x, spatial)  # undoes the total // 2 low-side padding
        return x

    @torch.jit.unused
    def _check_valid(self, spatial: list[int]) -> None:
        self.output_shape(spatial)
