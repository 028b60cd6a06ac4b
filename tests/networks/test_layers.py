"""The CPU inference paths of pipelines.networks.layers give their torch.nn parent's results."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from pipelines.networks.layers import (
    MaxPool2x2d,
    MaxPool2x3d,
    OneDNNConv3d,
    PointwiseConv2d,
    PointwiseConv3d,
    UpConv2d,
    UpConv3d,
    layer_type,
)


def _pairs(dims: int) -> list[tuple[nn.Module, nn.Module, tuple[int, ...]]]:
    """(ours, the parent with the same weights, input shape) for the layers of ``dims`` dimensions."""
    torch.manual_seed(dims)
    spatial = (9, 8, 7)[:dims]
    if dims == 3:
        ours = [OneDNNConv3d(1, 4, 3, padding=1, bias=False), OneDNNConv3d(3, 5, 3, padding=0),
                PointwiseConv3d(6, 3), UpConv3d(6, 4), MaxPool2x3d()]
    else:
        ours = [PointwiseConv2d(6, 3), PointwiseConv2d(6, 2, bias=False), UpConv2d(6, 4), MaxPool2x2d()]
    pairs = []
    for layer in ours:
        parent = next(c for c in type(layer).__mro__ if c.__module__.startswith("torch.nn") and c is not nn.Module)
        plain = parent.__new__(parent)
        plain.__dict__.update(layer.__dict__)  # the same parameters and settings, the parent's forward
        channels = getattr(layer, "in_channels", 3)
        pairs.append((layer, plain, (2, channels, *spatial)))
    return pairs


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_fast_paths_equal_the_parent_layers(dims, batch):
    for ours, plain, shape in _pairs(dims):
        x = torch.randn(batch, *shape[1:])
        with torch.inference_mode():
            fast, reference = ours(x), plain(x)
        assert fast.shape == reference.shape, type(ours).__name__
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5, msg=type(ours).__name__)


def _ops(module: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How often ``module(x)`` calls each operator."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        module(x)
    return {event.key: event.count for event in prof.key_averages()}


def test_fast_paths_are_taken_in_inference_only():
    x = torch.randn(1, 1, 24, 24, 24)
    conv = OneDNNConv3d(1, 4, 3, padding=1)  # N*C*D*H = 576: PyTorch's own choice is its slow kernel
    with torch.inference_mode():
        assert "aten::mkldnn_convolution" in _ops(conv, x)
        assert "aten::slow_conv3d_forward" in _ops(nn.Conv3d.forward.__get__(conv), x)
        assert "aten::convolution" not in _ops(PointwiseConv3d(1, 3), x)
        assert "aten::convolution" not in _ops(UpConv3d(1, 2), x)
        assert "aten::max_pool3d_with_indices" not in _ops(MaxPool2x3d(), x)
        # one 2D product per item straight into the output: no batched product, no result transposed in a
        # copy (torch.matmul does one or the other, depending on the shapes)
        for batch in (torch.randn(1, 4, 8, 8, 8), torch.randn(2, 4, 8, 8, 8)):
            for layer, copies in ((PointwiseConv3d(4, 3, bias=False), 0), (UpConv3d(4, 2), 1)):  # up: the interleaving
                ops = _ops(layer, batch)
                counts = {name: ops.get(name, 0) for name in ("aten::mm", "aten::bmm", "aten::copy_")}
                assert counts == {"aten::mm": len(batch), "aten::bmm": 0, "aten::copy_": copies}, type(layer).__name__
    # with autograd on: the parent's operators, and gradients flow
    for layer in (conv, PointwiseConv3d(1, 3), UpConv3d(1, 2)):
        assert "aten::convolution" in _ops(layer, x)
        layer(x.requires_grad_()).sum().backward()
        assert x.grad is not None and layer.weight.grad is not None
        x = x.detach()


def test_flop_counter_sees_the_parent_operators():
    for dims in (2, 3):
        for ours, plain, shape in _pairs(dims):
            x = torch.randn(shape)
            counts = []
            for layer in (ours, plain):
                counter = FlopCounterMode(display=False)
                with torch.inference_mode(), counter:
                    layer(x)
                counts.append(counter.get_total_flops())
            assert counts[0] == counts[1], type(ours).__name__
            assert counts[0] > 0 or isinstance(ours, (MaxPool2x2d, MaxPool2x3d))


def test_unet_layers_come_from_one_lookup():
    from pipelines.networks import UNet

    for dims, (conv, pointwise, up, pool) in {2: (nn.Conv2d, PointwiseConv2d, UpConv2d, MaxPool2x2d),
                                             3: (OneDNNConv3d, PointwiseConv3d, UpConv3d, MaxPool2x3d)}.items():
        assert [layer_type(k, dims) for k in ("conv", "pointwise", "up", "pool")] == [conv, pointwise, up, pool]
        net = UNet(dims, 1, 2, features=(4, 8), padding="same")
        assert type(net.pool) is pool and type(net.head) is pointwise and type(net.decoder[0].up) is up
        assert {type(m) for m in net.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)} == {conv, pointwise}
    with pytest.raises(ValueError, match="no 'up' layer for 1 spatial dimensions"):
        layer_type("up", 1)
