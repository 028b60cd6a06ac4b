from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipelines.networks import UNet

NORMS = [None, "batch", "instance", "group", ("group", {"num_groups": 2})]


def expected_parameters(dims, in_channels, out_channels, features, norm=None, skip="concat", up_mode="transpose"):
    """Parameter count written out from the architecture, independently of the implementation."""
    kernel = 3**dims
    bias = norm is None

    def conv(cin, cout, taps, with_bias=True):
        return cin * cout * taps + (cout if with_bias else 0)

    def double(cin, cout):
        norm_params = 0 if norm is None else 2 * cout  # affine scale and shift
        return conv(cin, cout, kernel, bias) + conv(cout, cout, kernel, bias) + 2 * norm_params

    total, previous = 0, in_channels
    for f in features:
        total += double(previous, f)
        previous = f
    for level in range(len(features) - 1):
        deeper, f = features[level + 1], features[level]
        total += conv(deeper, f, 2**dims if up_mode == "transpose" else 1)
        total += double(2 * f if skip == "concat" else f, f)
    return total + conv(features[0], out_channels, 1)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_network_parameters_and_shape():
    net = UNet(2, 1, 2)
    assert count(net) == 31_030_658
    assert expected_parameters(2, 1, 2, (64, 128, 256, 512, 1024)) == 31_030_658
    assert net.output_shape((572, 572)) == (388, 388)
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, 572, 572)).shape == (1, 2, 388, 388)


@pytest.mark.slow
def test_paper_3d_shape():
    net = UNet(3, 1, 2, features=(32, 64, 128, 256)).eval()
    assert net.output_shape((132, 132, 116)) == (44, 44, 28)
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 132, 132, 116)).shape == (1, 2, 44, 44, 28)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("skip", ["concat", "sum"])
@pytest.mark.parametrize("up_mode", ["transpose", "upsample"])
def test_parameter_count_matches_architecture(dims, norm, skip, up_mode):
    features = (4, 8, 16)
    net = UNet(dims, 2, 3, features=features, norm=norm, skip=skip, up_mode=up_mode)
    norm_name = norm if norm is None or isinstance(norm, str) else norm[0]
    assert count(net) == expected_parameters(dims, 2, 3, features, norm_name, skip, up_mode)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("skip", ["concat", "sum"])
@pytest.mark.parametrize("up_mode", ["transpose", "upsample"])
def test_valid_shapes(dims, norm, skip, up_mode):
    net = UNet(dims, 2, 3, features=(4, 8, 16), norm=norm, skip=skip, up_mode=up_mode)
    size = (44, 52, 60)[:dims]  # 12 + 8k: valid for two poolings
    out = net.output_shape(size)
    assert out == tuple(s - 40 for s in size)  # context of 20 pixels per side
    y = net(torch.randn(2, 2, *size))
    assert y.shape == (2, 3, *out)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("skip", ["concat", "sum"])
@pytest.mark.parametrize("up_mode", ["transpose", "upsample"])
def test_same_shapes_odd_sizes(dims, norm, skip, up_mode):
    net = UNet(dims, 1, 2, features=(4, 8, 16), padding="same", norm=norm, skip=skip, up_mode=up_mode)
    for size in [(33, 34, 35), (9, 16, 7), (5, 6, 3)]:
        size = size[:dims]
        y = net(torch.randn(2, 1, *size))
        assert y.shape == (2, 2, *size)
        assert net.output_shape(size) == size
    if norm != "instance":  # instance norm needs more than one pixel at the bottleneck
        net.eval()
        assert net(torch.randn(1, 1, *(1, 2, 3)[:dims])).shape == (1, 2, *(1, 2, 3)[:dims])


def test_same_padding_is_centred():
    """The internal padding puts total // 2 zeros before the image; the crop must take the same pixels."""
    torch.manual_seed(0)
    net = UNet(2, 1, 1, features=(2, 4, 8), padding="same").eval()
    x = torch.randn(1, 1, 13, 10)  # padded internally to 16 x 12: (1, 2) rows and (1, 1) columns
    with torch.no_grad():
        manual = net(torch.nn.functional.pad(x, (1, 1, 1, 2)))[..., 1:14, 1:11]
        assert torch.allclose(net(x), manual, atol=1e-6)


def test_invalid_size_names_nearest_valid_sizes():
    net = UNet(2, 1, 2)
    with pytest.raises(ValueError, match=r"570 along spatial axis 0 .* nearest valid sizes: 556 or 572"):
        net(torch.zeros(1, 1, 570, 572))
    with pytest.raises(ValueError, match=r"nearest valid sizes: 188$"):
        net.output_shape((20, 188))


@pytest.mark.parametrize("dims,features", [(2, (64, 128, 256, 512, 1024)), (3, (8, 16, 32, 64)), (2, (4, 8))])
def test_valid_input_shape_is_smallest_covering(dims, features):
    net = UNet(dims, 1, 1, features=features)
    for want in (1, 5, 37, 100, 388):
        size = net.valid_input_shape((want,) * dims)[0]
        assert net.output_shape((size,) * dims)[0] >= want
        for smaller in range(1, size):
            out = net._valid_output_1d(smaller)
            assert out is None or out < want, (want, size, smaller)


def test_valid_input_shape_same_padding_rounds_to_factor():
    net = UNet(3, 1, 1, features=(4, 8, 16, 32), padding="same")
    assert net.downsample_factor == 8
    assert net.valid_input_shape((33, 8, 1)) == (40, 8, 8)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("act", ["relu", "leakyrelu", "prelu"])
def test_every_parameter_gets_a_gradient(dims, padding, act):
    torch.manual_seed(0)
    net = UNet(dims, 1, 2, features=(3, 5, 7), padding=padding, act=act, norm="instance", dropout=0.2)
    size = (44, 52, 44)[:dims]
    net(torch.randn(2, 1, *size)).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_levels_have_their_own_weights():
    """Equal widths at every level would let one block serve all levels; the model must not share."""
    net = UNet(2, 8, 8, features=(8, 8, 8, 8), skip="sum")
    params = list(net.named_parameters(remove_duplicate=False))
    assert len({id(p) for _, p in params}) == len(params)
    assert len({p.data_ptr() for _, p in params}) == len(params)
    assert count(net) == expected_parameters(2, 8, 8, (8, 8, 8, 8), skip="sum")
    assert len(net.decoder) == 3 and len(net.encoder) == 4
    assert len({id(block) for block in net.decoder}) == 3
    # changing one decoder level changes the output, and changing another changes it differently
    x = torch.randn(1, 8, 124, 124)
    base = net(x)
    outputs = []
    for level in range(3):
        with torch.no_grad():
            w = net.decoder[level].convs.conv1.weight
            w.add_(0.1)
            outputs.append(net(x))
            w.sub_(0.1)
    assert all(not torch.allclose(o, base) for o in outputs)
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])


def test_no_activation_on_output():
    torch.manual_seed(0)
    net = UNet(2, 1, 2, features=(4, 8), padding="same")
    assert isinstance(net.head, nn.Conv2d) and net.head.kernel_size == (1, 1)
    y = net(torch.randn(1, 1, 16, 16))
    assert (y < 0).any()  # no ReLU, sigmoid or softmax after the last convolution
    assert not torch.allclose(y.sum(dim=1), torch.ones(1, 16, 16))


def test_he_initialisation():
    torch.manual_seed(0)
    net = UNet(2, 1, 2, features=(64, 128))
    w = net.encoder[1].conv2.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / (9 * 128)), rel=0.02)
    up = net.decoder[0].up.weight  # transpose 128 -> 64: each output sees 128 inputs
    assert up.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.05)
    assert all((m.bias == 0).all() for m in net.modules() if isinstance(m, nn.Conv2d) and m.bias is not None)


def test_dropout_at_end_of_contracting_path():
    net = UNet(2, 1, 2, features=(4, 8), dropout=0.5, padding="same")
    assert isinstance(net.dropout, nn.Dropout) and net.dropout.p == 0.5
    x = torch.randn(1, 1, 16, 16)
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))
    assert isinstance(UNet(2, 1, 2, features=(4, 8)).dropout, nn.Identity)


def test_leakyrelu_slope_and_norm_options():
    net = UNet(3, 1, 2, features=(8, 12), act="leakyrelu", norm="group")
    act = net.encoder[0].act1
    assert isinstance(act, nn.LeakyReLU) and act.negative_slope == 0.2
    groups = {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {8, 4}  # 8 groups for 8 channels, gcd(8, 12) = 4 for 12
    instance = UNet(2, 1, 2, features=(4, 8), norm="instance").encoder[0].norm1
    assert isinstance(instance, nn.InstanceNorm2d) and instance.affine
    custom = UNet(2, 1, 2, features=(4, 8), act=("elu", {"alpha": 0.5})).encoder[0].act1
    assert isinstance(custom, nn.ELU) and custom.alpha == 0.5


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"spatial_dims": 1}, ValueError, "`spatial_dims` must be 2 or 3, got 1"),
        ({"in_channels": 0}, ValueError, "`in_channels` must be a positive integer, got 0"),
        ({"features": (8,)}, ValueError, "`features` must hold at least two"),
        ({"padding": "full"}, ValueError, "`padding` must be one of .*got 'full'"),
        ({"up_mode": "pixelshuffle"}, ValueError, "`up_mode` must be one of"),
        ({"skip": "attention"}, ValueError, "`skip` must be one of"),
        ({"norm": "layer"}, ValueError, "`norm` must be one of .*got 'layer'"),
        ({"norm": 3}, TypeError, "`norm` must be None, a name or a"),
        ({"act": "swish"}, ValueError, "`act` must be one of"),
        ({"dropout": 1.0}, ValueError, "`dropout` must be in"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": (4, 8)} | kwargs
    with pytest.raises(error, match=match):
        UNet(**args)


def test_bad_input_tensor():
    net = UNet(2, 3, 2, features=(4, 8), padding="same")
    with pytest.raises(ValueError, match="2 spatial axes"):
        net(torch.zeros(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="must have 3 channels, got 1"):
        net(torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("dims,padding,size", [(2, "valid", (60, 68)), (3, "same", (17, 18, 19))])
def test_torch_export(dims, padding, size):
    torch.manual_seed(0)
    net = UNet(dims, 1, 2, features=(4, 8, 16), padding=padding, norm="batch").eval()
    x = torch.randn(1, 1, *size)
    program = torch.export.export(net, (x,))
    assert torch.allclose(program.module()(x), net(x), atol=1e-5)


def test_onnx_export_matches(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = UNet(2, 1, 2, features=(4, 8, 16)).eval()
    x = torch.randn(1, 1, 60, 68)
    path = tmp_path / "unet.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(result), net(x), atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_layers_are_plain_torch_nn(dims):
    """The model holds plain torch.nn layers (CPU inference variants are swapped in by pipelines.networks.cpu)."""
    from monai.networks.layers.factories import Conv, Pool

    net = UNet(dims, 1, 2, features=(4, 8, 16), padding="same", norm="instance")
    assert type(net.pool) is Pool["max", dims] and type(net.head) is Conv["conv", dims]
    assert all(type(up.up) is Conv["convtrans", dims] for up in net.decoder)
    kinds = {type(m) for m in net.modules() if not any(m.children())}
    assert all(kind.__module__.startswith("torch.nn.") for kind in kinds), kinds
    upsampled = UNet(dims, 1, 2, features=(4, 8), up_mode="upsample")
    assert [type(m) for m in upsampled.decoder[0].up] == [Conv["conv", dims], nn.Upsample]
