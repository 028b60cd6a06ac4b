"""The U-Net's CPU inference kernels, swapped into a model and out again.

:class:`~pipelines.networks.UNet` is built from plain ``torch.nn`` layers. For inference on the CPU
:func:`for_cpu_inference` changes the class of the U-Net, of its blocks and of its layers to
subclasses whose forward takes faster kernels (:mod:`pipelines.networks.layers`):

- the 3D U-Net converts its input to channels-last, so its convolutions run in oneDNN's own layout
  (the 1x1 head returns channels-first);
- the double convolution normalises each convolution's fresh output in place when its
  normalisation is an instance norm that uses the input's statistics
  (:func:`~pipelines.networks.layers.instance_norm_`);
- the 2x2 up-convolution writes straight into its half of the skip concatenation;
- 3D convolutions stay on oneDNN, 1x1 convolutions and up-convolutions are matrix products, max
  pooling is a pairwise maximum.

Only modules of exactly these types are swapped (a subclass of them, or any module outside a
U-Net, is left alone). The module objects stay the same: the same parameters (no copies), the same
state dict, hooks and attributes; outputs match the plain network to float32 rounding. Each fast
forward falls back to the plain one whenever autograd is on, the module is in training mode, the
input or the parameters are not float32 on the CPU, and under scripting, tracing, ``torch.export``,
``torch.compile`` or a dispatch mode (:func:`~pipelines.networks.layers.cpu_inference_path`), so a
converted model trains, exports and counts FLOPs exactly as the plain one.

How it is applied:

- :class:`~pipelines.inference.BlendedSlidingWindowInferer` and
  :class:`~pipelines.inference.OverlapTileInferer` enter :func:`cpu_inference` on the network they
  are given whenever it runs on the CPU: the kernels are swapped in for the call and the network is
  left as it was found. So ``python -m monai.bundle run`` with a bundle's inference config, the
  validation inside training and the batch job get them with no change to configs or callers, and
  the network being trained never changes class.
- Code that runs the network itself (``net(x)`` under ``torch.inference_mode``, MONAI's
  ``sliding_window_inference``) calls :func:`for_cpu_inference` once after loading the weights;
  the change lasts, and the inferers then find nothing to swap.

Swapping is one class assignment per module of the U-Net, negligible beside a single window.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pipelines.networks import layers
from pipelines.networks.layers import cpu_inference_path
from pipelines.networks.unet import UNet, _center_crop, _DoubleConv, _Up

__all__ = ["cpu_inference", "for_cpu_inference"]

_INSTANCE_NORMS = (nn.InstanceNorm2d, nn.InstanceNorm3d)


def _normalises_in_place(norm: nn.Module | None, x: torch.Tensor) -> bool:
    """Whether ``norm`` is an instance norm that uses the input's statistics and may run on ``x`` here."""
    return (isinstance(norm, _INSTANCE_NORMS) and not norm.track_running_stats
            and cpu_inference_path(x, x.dim() - 2, norm))


class _CPUDoubleConv(_DoubleConv):
    """:class:`~pipelines.networks.unet._DoubleConv` whose instance normalisations run in place on each
    convolution's output in CPU inference (:func:`~pipelines.networks.layers.instance_norm_`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norms = [getattr(self, "norm1", None), getattr(self, "norm2", None)]
        if not (cpu_inference_path(x, x.dim() - 2, self) and all(_normalises_in_place(m, x) for m in norms)):
            return super().forward(x)
        for i, norm in enumerate(norms, start=1):
            x = layers.instance_norm_(getattr(self, f"conv{i}")(x), norm.weight, norm.bias, norm.eps)
            x = getattr(self, f"act{i}")(x)
        return x


class _CPUUp(_Up):
    """:class:`~pipelines.networks.unet._Up` whose 2x2 up-convolution writes straight into its half of
    the skip concatenation in CPU inference."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        dims = x.dim() - 2
        up_convolution = isinstance(self.up, (layers.UpConv2d, layers.UpConv3d)) and self.up.fits(self.up)
        if not (self.skip == "concat" and up_convolution
                and cpu_inference_path(x, dims, self) and cpu_inference_path(x, dims, self.up)):
            return super().forward(x, skip)
        channels, size = skip.shape[1], [s * k for s, k in zip(x.shape[2:], self.up.kernel_size)]
        merged = torch.empty((x.shape[0], 2 * channels, *size), dtype=x.dtype, memory_format=layers.memory_format(x))
        merged[:, :channels] = _center_crop(skip, size)
        self.up.into(x, merged[:, channels:])
        return self.convs(merged)


class _CPUUNet(UNet):
    """:class:`~pipelines.networks.UNet` that runs channels-last in 3D CPU inference (the padding keeps
    the layout; the 1x1 head returns channels-first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 3 and cpu_inference_path(x, 3, self):
            x = layers.channels_last(x)
        return super().forward(x)


# exact type -> the CPU inference class for a module of that type, or None where its settings do not fit
_VARIANTS: dict[type[nn.Module], Callable[[nn.Module], type[nn.Module] | None]] = {
    UNet: lambda m: _CPUUNet,
    _DoubleConv: lambda m: _CPUDoubleConv,
    _Up: lambda m: _CPUUp,
    nn.Conv2d: lambda m: layers.PointwiseConv2d if layers.PointwiseConv2d.fits(m) else None,
    nn.Conv3d: lambda m: (layers.PointwiseConv3d if layers.PointwiseConv3d.fits(m)
                          else layers.OneDNNConv3d if layers.OneDNNConv3d.fits(m) else None),
    nn.ConvTranspose2d: lambda m: layers.UpConv2d if layers.UpConv2d.fits(m) else None,
    nn.ConvTranspose3d: lambda m: layers.UpConv3d if layers.UpConv3d.fits(m) else None,
    nn.MaxPool2d: lambda m: layers.MaxPool2x2d if layers.MaxPool2x2d.fits(m) else None,
    nn.MaxPool3d: lambda m: layers.MaxPool2x3d if layers.MaxPool2x3d.fits(m) else None,
}

_lock = threading.Lock()
_open: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()  # cpu_inference contexts per U-Net
_swapped: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()  # (module, plain class) to restore


def _unets(model: object) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, UNet)] if isinstance(model, nn.Module) else []


def _swap_in(unet: nn.Module) -> list[tuple[nn.Module, type]]:
    """Give each plain module of ``unet`` its CPU inference class; the ``(module, plain class)`` pairs changed."""
    changed = []
    for module in unet.modules():
        variant = _VARIANTS.get(type(module), lambda m: None)(module)
        if variant is not None:
            changed.append((module, type(module)))
            module.__class__ = variant
    return changed


def for_cpu_inference(model: nn.Module) -> nn.Module:
    """Swap the CPU inference kernels into every :class:`~pipelines.networks.UNet` in ``model``, for good.

    In place: the modules, parameters and state dict stay the same (see the module docstring); other
    modules are left alone. Training, other devices and dtypes still take the plain forwards, so the
    model may be trained or moved afterwards. Calling it again changes nothing.

    Args:
        model: a U-Net or any module holding U-Nets (a wrapper such as DistributedDataParallel).

    Returns:
        ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    with _lock:
        for unet in _unets(model):
            _swap_in(unet)
            _swapped.pop(unet, None)  # an open cpu_inference no longer restores it
    return model


@contextmanager
def cpu_inference(network: object) -> Iterator[None]:
    """:func:`for_cpu_inference` while inside; on exit the U-Nets it converted are plain again.

    Nested and concurrent uses on one network share one conversion: the first entry swaps the
    kernels in, the last exit swaps them out. A network converted for good by
    :func:`for_cpu_inference` stays converted, and anything other than a module (a function, a
    lambda) is left alone.

    Args:
        network: what an inferer was given to run.
    """
    unets = _unets(network)
    with _lock:
        for unet in unets:
            _open[unet] = _open.get(unet, 0) + 1
            if _open[unet] == 1:
                _swapped[unet] = _swap_in(unet)
    try:
        yield
    finally:
        with _lock:
            for unet in unets:
                _open[unet] -= 1
                if _open[unet] == 0:
                    del _open[unet]
                    for module, plain in reversed(_swapped.pop(unet, [])):
                        module.__class__ = plain
