"""CPU inference variants of ``torch.nn`` layers: the same parameters, a faster forward in inference.

:func:`pipelines.networks.cpu.for_cpu_inference` swaps these into a U-Net; each is a subclass of its
``torch.nn`` layer that adds no parameter or buffer, so a module's class can change back and forth
and its state dict stays the same. On the CPU, in float32, in eval mode and without autograd, each
takes a kernel that PyTorch does not pick by itself:

- :class:`OneDNNConv3d`: 3D convolutions stay on oneDNN at any batch size; PyTorch sends those
  with ``N*C*D*H <= 20480`` (the first and the deepest convolutions of a 3D U-Net on one window)
  to its slow reference kernel;
- :class:`PointwiseConv2d`, :class:`PointwiseConv3d`: a 1x1 convolution is one 2D matrix product
  per batch item (a batched ``torch.matmul`` would compute the transposed product and copy it);
- :class:`UpConv2d`, :class:`UpConv3d`: an up-convolution whose kernel equals its stride is one 2D
  matrix product per batch item and an interleaving copy, and can write straight into a slice of
  a larger tensor (:meth:`UpConv3d.into`: its half of a skip concatenation);
- :class:`MaxPool2x2d`, :class:`MaxPool2x3d`: 2x2 max pooling is an elementwise maximum of
  neighbours, axis by axis, without the int64 index map PyTorch's CPU kernel also writes.

Each takes channels-first or channels-last input (:func:`channels_last`). In channels-last 3D
convolutions oneDNN reads and writes its own layout directly, instead of reordering input and
output into its blocked layout and back into newly mapped memory. :func:`instance_norm_` normalises
a convolution's fresh output in place in either layout. Figures: docs/benchmarks.md, "The network's CPU speed".

Everywhere else (autograd on, training mode, other devices or dtypes, TorchScript, tracing,
``torch.export``, ``torch.compile``, and under a dispatch mode such as ``FlopCounterMode``, which
must see the layer's own operator) each layer runs exactly its ``torch.nn`` parent's forward.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = [
    "MaxPool2x2d", "MaxPool2x3d", "OneDNNConv3d", "PointwiseConv2d", "PointwiseConv3d", "UpConv2d", "UpConv3d",
    "channels_last", "cpu_inference_path", "instance_norm_", "memory_format",
]


def cpu_inference_path(x: torch.Tensor, dims: int, module: nn.Module | None = None) -> bool:
    """Whether ``x`` (batched, ``dims`` spatial axes) may take the hand-routed CPU kernels, in ``module``.

    True for a float32 CPU tensor without autograd, outside scripting, tracing, export, compilation
    and dispatch modes; with ``module``, also only in eval mode and when the module's own parameters
    have ``x``'s device and dtype.
    """
    if not (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == dims + 2
        and not torch.is_grad_enabled()
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not is_in_torch_dispatch_mode()
    ):
        return False
    if module is None:
        return True
    return not module.training and all(
        p.device == x.device and p.dtype == x.dtype for p in module.parameters(recurse=False)
    )


def _each(value, dims: int) -> tuple:
    """A layer setting given as one value or one per spatial axis, as a tuple of ``dims`` values."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


_NORM_BLOCK_BYTES = 2 << 20  # instance_norm_: voxels per block, in bytes; fits a core's L2 cache


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """Channels-last for a channels-last (and not also channels-first contiguous) ``(B, C, *spatial)``
    tensor of 2 or 3 spatial axes, else ``torch.contiguous_format``."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        if x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, C, *spatial)``, 2 or 3 spatial axes, in channels-last memory order.

    A one-channel tensor gets channel stride 1: PyTorch leaves it at the voxel count, and oneDNN
    then takes the input as channels-first and writes a channels-first output.
    """
    x = x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    if x.shape[1] == 1:
        x = x.as_strided(x.shape, (x.stride(0), 1, *x.stride()[2:]))
    return x


def _voxels_by_channel(x: torch.Tensor) -> torch.Tensor:
    """``(B, voxels, C)`` view of a channels-last ``x`` (a copy for other layouts)."""
    return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])


def instance_norm_(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Instance normalisation of ``x`` ``(B, C, *spatial)`` in place (statistics of each item and channel).

    Channels-first: PyTorch's own batch-norm kernel over ``(1, B * C, voxels)``, which is what
    ``F.instance_norm`` runs, writing into ``x``. Channels-last: in blocks of voxels that stay in
    the CPU cache, each block is shifted by a sampled mean and its sum and sum of squares are added
    up; the shift keeps a large mean from cancelling digits (PyTorch's channels-last batch-norm
    kernel sums in one float32 pass and loses every digit at a mean of 1000 with a standard
    deviation of 1; this stays within float32 rounding of a float64 reference). Other layouts are
    normalised out of place and copied back.

    Args:
        x: a float tensor nothing else needs unnormalised, such as a convolution's output.
        weight, bias: per-channel affine ``(C,)``, or None.
        eps: added to the variance.

    Returns:
        ``x``.
    """
    n, c = x.shape[:2]
    if x.is_contiguous():
        flat = x.view(1, n * c, -1)
        torch.ops.aten.native_batch_norm.out(
            flat, None if weight is None else weight.repeat(n), None if bias is None else bias.repeat(n),
            None, None, True, 0.0, eps, out=flat, save_mean=x.new_empty(n * c), save_invstd=x.new_empty(n * c),
        )
        return x
    if memory_format(x) is torch.contiguous_format:
        return x.copy_(nn.functional.instance_norm(x, weight=weight, bias=bias, eps=eps))
    flat = _voxels_by_channel(x)
    voxels = flat.shape[1]
    rows = max(1, _NORM_BLOCK_BYTES // (x.element_size() * c))
    squares = x.new_empty(min(rows, voxels), c)
    for item in flat:  # (voxels, C)
        shift = item[:: max(1, voxels // 2048)].mean(0)
        sums, sums_of_squares = x.new_zeros(c), x.new_zeros(c)
        for start in range(0, voxels, rows):
            block = item[start : start + rows].sub_(shift)
            sums += block.sum(0)
            sums_of_squares += torch.mul(block, block, out=squares[: block.shape[0]]).sum(0)
        mean = sums.div_(voxels)  # of the shifted values
        scale = (sums_of_squares.div_(voxels) - mean * mean).clamp_(min=0).add_(eps).rsqrt_()
        if weight is not None:
            scale.mul_(weight)
        offset = mean.mul_(scale).neg_()
        if bias is not None:
            offset.add_(bias)
        torch.addcmul(offset, item, scale, out=item)
    return x


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` that uses oneDNN on the CPU in inference whatever the batch size."""

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        """Whether ``layer``'s settings suit this kernel: a 3D convolution with numeric zero padding."""
        return isinstance(layer, nn.Conv3d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            cpu_inference_path(x, 3, self)
            and self.fits(self)
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
        ):
            return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,
                                                     self.dilation, self.groups)
        return super().forward(x)


class _Pointwise:
    """1x1 convolution (stride 1, no padding, one group) as ``weight (out, in) @ x (N, in, voxels)``
    in CPU inference (``x`` transposed when channels-last); the output is channels-first."""

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        """Whether ``layer`` is a 1x1 convolution: kernel and stride 1, no padding, one group."""
        if not isinstance(layer, (nn.Conv2d, nn.Conv3d)) or isinstance(layer.padding, str):
            return False
        dims = len(layer.kernel_size)
        return (_each(layer.kernel_size, dims) == (1,) * dims and _each(layer.stride, dims) == (1,) * dims
                and _each(layer.padding, dims) == (0,) * dims and layer.groups == 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (cpu_inference_path(x, len(self.kernel_size), self) and self.fits(self)):  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        n, channels = x.shape[:2]
        weight = self.weight.view(self.out_channels, channels)  # type: ignore[attr-defined]
        flat = x.view(n, channels, -1) if x.is_contiguous() else _voxels_by_channel(x).transpose(1, 2)
        y = torch.empty(n, self.out_channels, flat.shape[2], dtype=x.dtype)  # type: ignore[attr-defined]
        for item in range(n):  # 2D products: a batched matmul transposes the (voxels, out) result in a copy
            if self.bias is None:  # type: ignore[attr-defined]
                torch.mm(weight, flat[item], out=y[item])
            else:
                torch.addmm(self.bias.view(-1, 1), weight, flat[item], out=y[item])  # type: ignore[attr-defined]
        return y.view(n, self.out_channels, *x.shape[2:])  # type: ignore[attr-defined]


class PointwiseConv2d(_Pointwise, nn.Conv2d):
    """``nn.Conv2d(in, out, kernel_size=1)`` with a matrix-product CPU inference path."""


class PointwiseConv3d(_Pointwise, nn.Conv3d):
    """``nn.Conv3d(in, out, kernel_size=1)`` with a matrix-product CPU inference path."""


class _Up:
    """Up-convolution whose kernel equals its stride (no overlap, no padding, one group): in CPU
    inference one product ``weight (out * taps, in) @ x (N, in, voxels)`` (transposed for
    channels-last ``x``), then each tap's output interleaved into place; the output has the input's
    memory format."""

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        """Whether ``layer`` is a transposed convolution whose kernel equals its stride, without
        padding, dilation or groups."""
        if not isinstance(layer, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            return False
        dims = len(layer.kernel_size)
        return (_each(layer.kernel_size, dims) == _each(layer.stride, dims)
                and _each(layer.padding, dims) == (0,) * dims and _each(layer.output_padding, dims) == (0,) * dims
                and _each(layer.dilation, dims) == (1,) * dims and layer.groups == 1 and layer.padding_mode == "zeros")

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None or not (cpu_inference_path(x, len(self.kernel_size), self) and self.fits(self)):  # type: ignore[attr-defined]
            return super().forward(x, output_size)  # type: ignore[misc]
        shape = (x.shape[0], self.out_channels, *(s * k for s, k in zip(x.shape[2:], self.kernel_size)))  # type: ignore[attr-defined]
        return self.into(x, torch.empty(shape, dtype=x.dtype, memory_format=memory_format(x)))

    def into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write the up-convolution of ``x`` ``(N, in, *spatial)`` into ``out`` ``(N, out, *spatial * factor)``,
        a tensor or view of any strides (such as a channel slice of a concatenation); CPU inference only.

        Returns:
            ``out``.
        """
        kernel = self.kernel_size  # type: ignore[attr-defined]
        dims = len(kernel)
        n, channels = x.shape[:2]
        spatial = tuple(x.shape[2:])
        weight = self.weight.reshape(channels, -1)  # type: ignore[attr-defined]  # (in, out * taps), output channel major
        if x.is_contiguous():
            flat = x.view(n, channels, -1)
            y = torch.empty(n, weight.shape[1], flat.shape[2], dtype=x.dtype)
            for item in range(n):  # 2D products, as in the 1x1 convolution
                torch.mm(weight.t(), flat[item], out=y[item])
            taps = y.view(n, self.out_channels, *kernel, *spatial)  # type: ignore[attr-defined]
        else:
            flat = _voxels_by_channel(x)
            y = torch.empty(n, flat.shape[1], weight.shape[1], dtype=x.dtype)
            for item in range(n):
                torch.mm(flat[item], weight, out=y[item])
            # (N, d1, d2, d3, out, k1, k2, k3) -> (N, out, k1, k2, k3, d1, d2, d3)
            taps = y.view(n, *spatial, self.out_channels, *kernel).permute(  # type: ignore[attr-defined]
                0, dims + 1, *range(dims + 2, 2 * dims + 2), *range(1, dims + 1))
        # tap k of voxel d lands at d * k_size + k: out as (N, out, d1, k1, d2, k2, d3, k3)
        target = out
        for axis, (size, k) in enumerate(zip(spatial, kernel)):
            target = target.unflatten(2 + 2 * axis, (size, k))
        target.copy_(taps.permute(0, 1, *itertools.chain.from_iterable((2 + dims + i, 2 + i) for i in range(dims))))
        if self.bias is not None:  # type: ignore[attr-defined]
            out.add_(self.bias.view(1, -1, *([1] * dims)))  # type: ignore[attr-defined]
        return out


class UpConv2d(_Up, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(in, out, kernel_size=f, stride=f)`` with a matrix-product CPU inference path."""


class UpConv3d(_Up, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d(in, out, kernel_size=f, stride=f)`` with a matrix-product CPU inference path."""


class _PairMax:
    """2x2(x2) max pooling, stride 2 (an odd last row is dropped, as by the parent); in CPU
    inference the maximum of neighbouring pairs along each axis in turn (the same values), in the
    input's memory format."""

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        """Whether ``layer`` is a 2x2(x2) max pooling of stride 2 without padding, dilation, ceil mode
        or indices."""
        if not isinstance(layer, (nn.MaxPool2d, nn.MaxPool3d)):
            return False
        dims = 3 if isinstance(layer, nn.MaxPool3d) else 2
        stride = layer.stride if layer.stride is not None else layer.kernel_size
        return (_each(layer.kernel_size, dims) == (2,) * dims and _each(stride, dims) == (2,) * dims
                and _each(layer.padding, dims) == (0,) * dims and _each(layer.dilation, dims) == (1,) * dims
                and not layer.ceil_mode and not layer.return_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = 3 if isinstance(self, nn.MaxPool3d) else 2
        if not (cpu_inference_path(x, dims, self) and self.fits(self)):  # type: ignore[arg-type]
            return super().forward(x)  # type: ignore[misc]
        layout = memory_format(x)  # kept: PyTorch would pick channels-first for the strided pairs
        for axis in reversed(range(2, 2 + dims)):  # the last axis first: the most data, read in order
            pairs = x.narrow(axis, 0, x.shape[axis] // 2 * 2).unflatten(axis, (-1, 2))
            first, second = pairs.select(axis + 1, 0), pairs.select(axis + 1, 1)
            x = torch.maximum(first, second, out=torch.empty(first.shape, dtype=x.dtype, memory_format=layout))
        return x


class MaxPool2x2d(_PairMax, nn.MaxPool2d):
    """``nn.MaxPool2d(2, 2)`` with a faster CPU inference path."""


class MaxPool2x3d(_PairMax, nn.MaxPool3d):
    """``nn.MaxPool3d(2, 2)`` with a faster CPU inference path."""
