"""The CPU inference variants in pipelines.networks.layers give their torch.nn parent's results."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from pipelines.networks.layers import (
    MaxPool2x2d,
    MaxPool2x3d,
    OneDNNConv3d,
    PointwiseConv2d,
    PointwiseConv3d,
    UpConv2d,
    UpConv3d,
    channels_last,
    instance_norm_,
    memory_format,
)


def _pairs(dims: int) -> list[tuple[nn.Module, nn.Module, tuple[int, ...]]]:
    """(ours, the parent with the same weights, input shape) for the layers of ``dims`` dimensions."""
    torch.manual_seed(dims)
    spatial = (9, 8, 7)[:dims]
    if dims == 3:
        ours = [OneDNNConv3d(1, 4, 3, padding=1, bias=False), OneDNNConv3d(3, 5, 3, padding=0),
                PointwiseConv3d(6, 3, 1), UpConv3d(6, 4, 2, stride=2), MaxPool2x3d(2, 2)]
    else:
        ours = [PointwiseConv2d(6, 3, 1), PointwiseConv2d(6, 2, 1, bias=False), UpConv2d(6, 4, 2, stride=2),
                MaxPool2x2d(2, 2)]
    pairs = []
    for layer in ours:
        layer.eval()
        parent = next(c for c in type(layer).__mro__ if c.__module__.startswith("torch.nn") and c is not nn.Module)
        plain = parent.__new__(parent)
        plain.__dict__.update(layer.__dict__)  # the same parameters and settings, the parent's forward
        channels = getattr(layer, "in_channels", 3)
        pairs.append((layer, plain, (2, channels, *spatial)))
    return pairs


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["channels-first", "channels-last"])
def test_fast_paths_equal_the_parent_layers(dims, batch, layout):
    for ours, plain, shape in _pairs(dims):
        x = torch.randn(batch, *shape[1:])
        if layout == "channels-last":
            x = channels_last(x)
        with torch.inference_mode():
            fast, reference = ours(x), plain(x)
        assert fast.shape == reference.shape, type(ours).__name__
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5, msg=type(ours).__name__)
        if isinstance(ours, (UpConv2d, UpConv3d, MaxPool2x2d, MaxPool2x3d)):  # the input's layout, for the next layer
            assert memory_format(fast) == memory_format(x), type(ours).__name__
        if isinstance(ours, (PointwiseConv2d, PointwiseConv3d)):  # the head: channels-first for the caller
            assert fast.is_contiguous(), type(ours).__name__


def test_channels_last_one_channel_makes_onednn_write_channels_last():
    x = torch.randn(1, 1, 6, 7, 8)
    y = channels_last(x)
    assert y.stride()[1] == 1 and torch.equal(y, x)
    assert memory_format(channels_last(torch.randn(2, 3, 4, 5))) == torch.channels_last
    conv = OneDNNConv3d(1, 4, 3, padding=1).eval()
    with torch.inference_mode():
        assert memory_format(conv(y)) == torch.channels_last_3d
        assert memory_format(conv(x)) == torch.contiguous_format  # PyTorch's strides: oneDNN writes channels-first


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("layout", ["channels-first", "channels-last", "strided"])
@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_in_place_equals_torch(dims, layout, affine):
    torch.manual_seed(0)
    x = torch.randn(2, 5, *(9, 10, 11)[:dims]) * 3 + 2
    weight, bias = (torch.rand(5) + 0.5, torch.randn(5)) if affine else (None, None)
    expected = nn.functional.instance_norm(x, weight=weight, bias=bias, eps=1e-5)
    target = {"channels-first": x.clone(), "channels-last": channels_last(x),
              "strided": x.clone().transpose(2, 3)}[layout]
    if layout == "strided":
        expected = expected.transpose(2, 3)
    with torch.inference_mode():
        result = instance_norm_(target, weight, bias, 1e-5)
    assert result.data_ptr() == target.data_ptr() and result.stride() == target.stride()
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("layout", ["channels-first", "channels-last"])
def test_instance_norm_in_place_keeps_digits_at_a_large_mean(layout):
    """PyTorch's channels-last batch-norm kernel sums in one float32 pass: off by 5 here."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 64, 64, 64) + 1000
    expected = nn.functional.instance_norm(x.double(), eps=1e-5)
    target = channels_last(x) if layout == "channels-last" else x.clone()
    with torch.inference_mode():
        instance_norm_(target, None, None, 1e-5)
    assert (target.double() - expected).abs().max() < 2e-4  # PyTorch's channels-first kernel: 8e-5


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("layout", ["channels-first", "channels-last"])
def test_up_convolution_writes_into_a_concatenation(dims, layout):
    torch.manual_seed(0)
    up = (UpConv2d, UpConv3d)[dims - 2](6, 4, 2, stride=2).eval()
    x, skip = torch.randn(2, 6, *(4, 5, 3)[:dims]), torch.randn(2, 4, *(8, 10, 6)[:dims])
    if layout == "channels-last":
        x, skip = channels_last(x), channels_last(skip)
    expected = torch.cat([skip, up(x)], 1).detach()  # autograd on: the parent's forward
    merged = torch.empty(expected.shape, memory_format=memory_format(x))
    merged[:, :4] = skip
    with torch.inference_mode():
        assert up.into(x, merged[:, 4:]).data_ptr() == merged[:, 4:].data_ptr()
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


def _ops(module: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How often ``module(x)`` calls each operator."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        module(x)
    return {event.key: event.count for event in prof.key_averages()}


def test_fast_paths_are_taken_in_inference_only():
    x = torch.randn(1, 1, 24, 24, 24)
    conv = OneDNNConv3d(1, 4, 3, padding=1).eval()  # N*C*D*H = 576: PyTorch's own choice is its slow kernel
    pointwise, up, pool = PointwiseConv3d(1, 3, 1).eval(), UpConv3d(1, 2, 2, stride=2).eval(), MaxPool2x3d(2, 2).eval()
    with torch.inference_mode():
        assert "aten::mkldnn_convolution" in _ops(conv, x)
        assert "aten::slow_conv3d_forward" in _ops(nn.Conv3d.forward.__get__(conv), x)
        assert "aten::convolution" not in _ops(pointwise, x)
        assert "aten::convolution" not in _ops(up, x)
        assert "aten::max_pool3d_with_indices" not in _ops(pool, x)
        # one 2D product per item straight into the output: no batched product, no result transposed in a
        # copy (torch.matmul does one or the other, depending on the shapes)
        for batch in (torch.randn(1, 4, 8, 8, 8), torch.randn(2, 4, 8, 8, 8)):
            for layer, copies in ((PointwiseConv3d(4, 3, 1, bias=False), 0), (UpConv3d(4, 2, 2, stride=2), 1)):  # up: the interleaving
                ops = _ops(layer.eval(), batch)
                counts = {name: ops.get(name, 0) for name in ("aten::mm", "aten::bmm", "aten::copy_")}
                assert counts == {"aten::mm": len(batch), "aten::bmm": 0, "aten::copy_": copies}, type(layer).__name__
        # training mode, or parameters of another dtype: the parent's operators
        for layer, parent_op in ((conv, "aten::convolution"), (pointwise, "aten::convolution"), (up, "aten::convolution"),
                                 (pool, "aten::max_pool3d_with_indices")):
            assert parent_op in _ops(layer.train(), x), type(layer).__name__
            layer.eval()
        assert "aten::slow_conv3d_forward" not in _ops(conv, x)
    # with autograd on: the parent's operators, and gradients flow
    for layer in (conv, pointwise, up):
        assert "aten::convolution" in _ops(layer, x)
        layer(x.requires_grad_()).sum().backward()
        assert x.grad is not None and layer.weight.grad is not None
        x = x.detach()


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv3d(4, 3, 3, padding="same"),  # a string padding: PyTorch's own padding logic
        nn.Conv3d(4, 3, 1, stride=2),  # 1x1 but strided
        nn.Conv2d(4, 2, 1, groups=2),
        nn.ConvTranspose3d(4, 2, 2, stride=1),  # kernel != stride: the taps overlap
        nn.ConvTranspose2d(4, 2, 2, stride=2, padding=1),
        nn.MaxPool3d(3, 2),
        nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.MaxPool2d(2, 2, return_indices=True),
    ],
    ids=str,
)
def test_layers_whose_settings_do_not_fit_keep_the_parent_forward(layer):
    """A variant whose kernel does not fit the layer's settings runs its parent's forward, even when given
    that class (variants are swapped in only where they fit: pipelines.networks.cpu)."""
    plain = type(layer)
    variants = {nn.Conv3d: (OneDNNConv3d, PointwiseConv3d), nn.Conv2d: (PointwiseConv2d,),
                nn.ConvTranspose3d: (UpConv3d,), nn.ConvTranspose2d: (UpConv2d,),
                nn.MaxPool3d: (MaxPool2x3d,), nn.MaxPool2d: (MaxPool2x2d,)}[plain]
    torch.manual_seed(0)
    x = torch.randn(1, 4, *(9, 8, 7)[: 3 if "3d" in plain.__name__ else 2])
    layer.eval()
    with torch.inference_mode():
        expected = layer(x)
        for variant in variants:
            if variant is OneDNNConv3d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
                continue  # every zero-padded 3D convolution fits oneDNN
            assert not variant.fits(layer), variant.__name__
            layer.__class__ = variant
            try:
                result = layer(x)
            finally:
                layer.__class__ = plain
            torch.testing.assert_close(result, expected, rtol=0, atol=0, msg=variant.__name__)
