"""Convolution layers with faster CPU kernels for inference; the same layers (and weights) otherwise.

On the CPU, in float32 and without autograd, three of the U-Net's layers run through kernels that
PyTorch does not pick by itself (measured on a 2-vCPU VM, ``bench_inference.py --sections limit``):

- 3D convolutions stay on oneDNN at batch 1: PyTorch sends those with ``N*C*D*H <= 20480`` (in the
  tumor U-Net at 96^3: 1->16 at 96^3, 32->64 at 24^3 and both at 12^3) to its slow reference
  kernel, about 6% of the network's time;
- 1x1 convolutions are one 2D matrix product per batch item (the head, 16->3 at 96^3: 9 ms instead
  of 44); a batched ``torch.matmul`` would compute the transposed product and copy it;
- 2x2 up-convolutions (kernel = stride) are one 2D matrix product per batch item and an
  interleaving copy (32->16 from 48^3: 79 ms instead of 109);
- 2x2 max pooling is an elementwise maximum of neighbours, axis by axis, without the int64 index
  map PyTorch's CPU kernel also writes (16 channels at 96^3: 5 ms instead of 33).

Everywhere else (training, other devices or dtypes, TorchScript, tracing, ``torch.export``,
``torch.compile``, and under a dispatch mode such as ``FlopCounterMode``, which must see the
layer's own operator) each layer is exactly its ``torch.nn`` parent. State dicts are unchanged.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = [
    "MaxPool2x2d", "MaxPool2x3d", "OneDNNConv3d", "PointwiseConv2d", "PointwiseConv3d", "UpConv2d", "UpConv3d",
    "cpu_inference_path", "layer_type",
]


def cpu_inference_path(x: torch.Tensor, dims: int) -> bool:
    """Whether ``x`` (batched, ``dims`` spatial axes) may take the hand-routed CPU kernels."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == dims + 2
        and not torch.is_grad_enabled()
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not is_in_torch_dispatch_mode()
    )


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` that uses oneDNN on the CPU in inference whatever the batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            cpu_inference_path(x, 3)
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
        ):
            return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,
                                                     self.dilation, self.groups)
        return super().forward(x)


class _Pointwise:
    """1x1 convolution as ``weight (out, in) @ x (N, in, voxels)`` in CPU inference."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)  # type: ignore[call-arg]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not cpu_inference_path(x, len(self.kernel_size)):
            return super().forward(x)  # type: ignore[misc]
        n, channels = x.shape[:2]
        weight, flat = self.weight.view(self.out_channels, channels), x.reshape(n, channels, -1)
        y = torch.empty(n, self.out_channels, flat.shape[2], dtype=x.dtype)
        for item in range(n):  # 2D products: a batched matmul transposes the (voxels, out) result in a copy
            if self.bias is None:
                torch.mm(weight, flat[item], out=y[item])
            else:
                torch.addmm(self.bias.view(-1, 1), weight, flat[item], out=y[item])
        return y.view(n, self.out_channels, *x.shape[2:])


class PointwiseConv2d(_Pointwise, nn.Conv2d):
    """``nn.Conv2d(in, out, kernel_size=1)`` with a matrix-product CPU inference path."""


class PointwiseConv3d(_Pointwise, nn.Conv3d):
    """``nn.Conv3d(in, out, kernel_size=1)`` with a matrix-product CPU inference path."""


class _Up:
    """Up-convolution whose kernel equals its stride (no overlap): in CPU inference one product
    ``weight (out * taps, in) @ x (N, in, voxels)``, then each tap's output interleaved into place."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2) -> None:
        super().__init__(in_channels, out_channels, kernel_size=factor, stride=factor)  # type: ignore[call-arg]

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        dims = len(self.kernel_size)
        if output_size is not None or not cpu_inference_path(x, dims):
            return super().forward(x, output_size)  # type: ignore[misc]
        n, channels = x.shape[:2]
        spatial = tuple(x.shape[2:])
        weight, flat = self.weight.reshape(channels, -1).t(), x.reshape(n, channels, -1)
        y = torch.empty(n, weight.shape[0], flat.shape[2], dtype=x.dtype)
        for item in range(n):  # 2D products, as in the 1x1 convolution
            torch.mm(weight, flat[item], out=y[item])
        y = y.view(n, self.out_channels, *self.kernel_size, *spatial)
        # (N, out, k1, k2, k3, d1, d2, d3) -> (N, out, d1, k1, d2, k2, d3, k3): tap k of voxel d lands at d*k_size + k
        order = [0, 1, *itertools.chain.from_iterable((2 + dims + i, 2 + i) for i in range(dims))]
        out = y.permute(order).reshape(n, self.out_channels, *(s * k for s, k in zip(spatial, self.kernel_size)))
        if self.bias is not None:
            out.add_(self.bias.view(1, -1, *([1] * dims)))
        return out


class UpConv2d(_Up, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(in, out, kernel_size=f, stride=f)`` with a matrix-product CPU inference path."""


class UpConv3d(_Up, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d(in, out, kernel_size=f, stride=f)`` with a matrix-product CPU inference path."""


class _PairMax:
    """2x2(x2) max pooling, stride 2 (an odd last row is dropped, as by the parent); in CPU
    inference the maximum of neighbouring pairs along each axis in turn (the same values)."""

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)  # type: ignore[call-arg]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = 3 if isinstance(self, nn.MaxPool3d) else 2
        if not cpu_inference_path(x, dims):
            return super().forward(x)  # type: ignore[misc]
        for axis in reversed(range(2, 2 + dims)):  # the contiguous axis first: the most data, read in order
            pairs = x.narrow(axis, 0, x.shape[axis] // 2 * 2).unflatten(axis, (-1, 2))
            x = torch.maximum(pairs.select(axis + 1, 0), pairs.select(axis + 1, 1))
        return x


class MaxPool2x2d(_PairMax, nn.MaxPool2d):
    """``nn.MaxPool2d(2, 2)`` with a faster CPU inference path."""


class MaxPool2x3d(_PairMax, nn.MaxPool3d):
    """``nn.MaxPool3d(2, 2)`` with a faster CPU inference path."""


_LAYER_TYPES: dict[str, dict[int, type[nn.Module]]] = {
    "conv": {2: nn.Conv2d, 3: OneDNNConv3d},
    "pointwise": {2: PointwiseConv2d, 3: PointwiseConv3d},
    "up": {2: UpConv2d, 3: UpConv3d},
    "pool": {2: MaxPool2x2d, 3: MaxPool2x3d},
}


def layer_type(kind: str, spatial_dims: int) -> type[nn.Module]:
    """The layer class of ``kind`` for 2 or 3 spatial dimensions: ``"conv"`` (any convolution),
    ``"pointwise"`` (1x1), ``"up"`` (kernel = stride up-convolution) or ``"pool"`` (2x2 max pooling)."""
    try:
        return _LAYER_TYPES[kind][spatial_dims]
    except KeyError:
        raise ValueError(f"no {kind!r} layer for {spatial_dims} spatial dimensions; kinds: {sorted(_LAYER_TYPES)}, "
                         f"spatial dimensions 2 or 3") from None
