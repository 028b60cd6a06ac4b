"""for_cpu_inference and cpu_inference: the U-Net's CPU kernels swapped in, the same model otherwise."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipelines.networks import UNet, cpu_inference, for_cpu_inference, layers

KWARGS = [
    {"padding": "same", "norm": "instance", "act": "leakyrelu"},
    {"padding": "same", "norm": ("instance", {"affine": False}), "up_mode": "upsample"},
    {"padding": "same", "norm": "instance", "skip": "sum"},
    {"padding": "same", "norm": "batch"},
    {"padding": "valid"},
]


def _net(dims: int, **kwargs) -> UNet:
    torch.manual_seed(0)
    return UNet(dims, 2, 3, features=(6, 10, 12), **kwargs)


def _input(net: UNet, batch: int = 2) -> torch.Tensor:
    dims = net.spatial_dims
    shape = (21, 18, 23)[:dims] if net.padding == "same" else net.valid_input_shape((8, 9, 10)[:dims])
    return torch.randn(batch, net.in_channels, *shape) * 4 + 3


def _classes(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kwargs", KWARGS)
def test_fast_path_equals_the_plain_path(dims, kwargs):
    """Channels-last, fused concatenation and in-place normalisation give the plain layers' result."""
    net = _net(dims, **kwargs).eval()
    x = _input(net)
    with torch.inference_mode():
        reference = net(x)  # plain torch.nn layers
        fast = for_cpu_inference(net)(x)
    assert type(net).__name__ == "_CPUUNet"
    assert fast.shape == reference.shape and fast.stride() == reference.stride()  # channels-first for the caller
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_3d_cpu_inference_runs_channels_last_with_norms_in_place():
    net = for_cpu_inference(UNet(3, 1, 2, features=(4, 8, 16), padding="same", norm="instance").eval())
    layouts, norm_calls = [], []
    for module in net.modules():
        if isinstance(module, nn.Conv3d) and module.kernel_size == (3, 3, 3):
            module.register_forward_pre_hook(lambda m, args: layouts.append(args[0].stride()[1] == 1))
        if isinstance(module, nn.InstanceNorm3d):
            module.register_forward_pre_hook(lambda m, args: norm_calls.append(m))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        net(x)
    assert len(layouts) == 10 and all(layouts) and not norm_calls  # channel stride 1: channels-last
    layouts.clear()
    net(x)  # autograd on: the torch.nn layers, channels-first
    assert not any(layouts[1:]) and len(norm_calls) == 10


@pytest.mark.parametrize("dims", [2, 3])
def test_each_module_gets_its_variant_and_keeps_its_parameters_and_state(dims):
    net = _net(dims, padding="same", norm="instance")
    parameters, buffers = list(net.parameters()), list(net.buffers())
    state = net.state_dict()
    for_cpu_inference(net)
    assert [type(m).__name__ for m in (net, net.encoder[0], net.decoder[0])] == ["_CPUUNet", "_CPUDoubleConv", "_CPUUp"]
    expected = {2: {nn.Conv2d, layers.PointwiseConv2d, layers.UpConv2d, layers.MaxPool2x2d},
                3: {layers.OneDNNConv3d, layers.PointwiseConv3d, layers.UpConv3d, layers.MaxPool2x3d}}[dims]
    assert {type(m) for m in net.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd))} == expected
    assert all(a is b for a, b in zip(net.parameters(), parameters, strict=True))  # the same objects: no copies
    assert all(a is b for a, b in zip(net.buffers(), buffers, strict=True))
    after = net.state_dict()
    assert list(after) == list(state)
    assert all(after[k] is state[k] or after[k].data_ptr() == state[k].data_ptr() for k in state)
    assert for_cpu_inference(net) is net and type(net).__name__ == "_CPUUNet"  # again: nothing changes


def test_shipped_weights_load_into_a_converted_network(tmp_path):
    """A state dict saved from a converted network loads into a plain one and the other way round."""
    plain = _net(3, padding="same", norm="instance")
    converted = for_cpu_inference(copy.deepcopy(plain))
    torch.save(converted.state_dict(), tmp_path / "model.pt")
    fresh = UNet(3, 2, 3, features=(6, 10, 12), padding="same", norm="instance")
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    for_cpu_inference(fresh).load_state_dict(plain.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), plain.state_dict().values()))


def test_other_modules_are_left_alone():
    class Custom(nn.Conv3d):
        """A user's subclass: not ours to swap."""

    class Wider(UNet):
        """A user's subclass of the U-Net: its blocks are ours, its forward is not."""

    unet = UNet(3, 1, 2, features=(4, 8), padding="same")
    unet.head = Custom(4, 2, 1)
    model = nn.Sequential(nn.Conv3d(1, 1, 1), nn.MaxPool3d(2, 2), unet, Wider(2, 1, 2, features=(4, 8)))
    for_cpu_inference(model)
    assert [type(m) for m in model[:2]] == [nn.Conv3d, nn.MaxPool3d] and type(unet.head) is Custom
    assert type(unet).__name__ == "_CPUUNet" and type(model[3]) is Wider
    assert type(model[3].encoder[0]).__name__ == "_CPUDoubleConv" and type(model[3].pool) is layers.MaxPool2x2d
    plain = nn.Sequential(nn.Conv3d(1, 1, 1))
    assert _classes(for_cpu_inference(plain)) == [nn.Sequential, nn.Conv3d]
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module, got function"):
        for_cpu_inference(lambda x: x)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_training_a_converted_network_gives_the_plain_gradients(dims, mode, norm):
    """With autograd on, in train or eval mode, the converted network runs exactly the plain layers."""
    plain = _net(dims, padding="same", norm=norm).train(mode == "train")
    converted = for_cpu_inference(copy.deepcopy(plain))
    x = _input(plain)
    results = []
    for net in (plain, converted):
        optimiser = torch.optim.SGD(net.parameters(), lr=0.1)
        loss = net(x).square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
        optimiser.step()
        results[-1] += (copy.deepcopy(net.state_dict()),)
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)  # weights and batch-norm statistics


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_train_mode_without_autograd_takes_the_plain_path(norm):
    """No fast kernel in training mode, even with autograd off (e.g. a batch-norm statistics pass)."""
    plain = _net(3, padding="same", norm=norm).train()
    converted = for_cpu_inference(copy.deepcopy(plain))
    calls = []
    for module in converted.modules():
        if isinstance(module, (nn.InstanceNorm3d, nn.BatchNorm3d)):
            module.register_forward_pre_hook(lambda m, args: calls.append(args[0].is_contiguous()))
    x = _input(plain)
    with torch.no_grad():
        expected, result = plain(x), converted(x)
    assert torch.equal(result, expected)
    assert len(calls) == 10 and all(calls)  # every norm module called, on channels-first input
    assert all(torch.equal(a, b) for a, b in zip(plain.buffers(), converted.buffers()))


def test_float64_and_flop_counting_see_the_plain_network():
    plain = _net(3, padding="same", norm="instance").eval()
    converted = for_cpu_inference(copy.deepcopy(plain))
    x = _input(plain, batch=1)
    with torch.inference_mode():
        assert torch.equal(converted.double()(x.double()), plain.double()(x.double()))
        plain.float(), converted.float()
        counts = []
        for net in (plain, converted):
            counter = FlopCounterMode(display=False)
            with counter:
                net(x)
            counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_parameters_of_another_dtype_take_the_plain_path():
    """float64 weights and a float32 input: the plain layers' error, not a kernel's."""
    plain = _net(3, padding="same", norm="instance").eval().double()
    converted = for_cpu_inference(copy.deepcopy(plain))
    messages = []
    for net in (plain, converted):
        with torch.inference_mode(), pytest.raises(RuntimeError) as error:
            net(_input(plain, batch=1))
        messages.append(str(error.value))
    assert messages[0] == messages[1]


def test_torch_export_of_a_converted_network_is_the_plain_graph():
    net = _net(3, padding="same", norm="instance").eval()
    x = _input(net, batch=1)
    with torch.no_grad():  # autograd off, as for an inference export: only the export checks keep the plain path
        plain_ops = {n.target for n in torch.export.export(net, (x,)).graph.nodes if n.op == "call_function"}
        program = torch.export.export(for_cpu_inference(net), (x,))
    ops = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert ops == plain_ops and torch.ops.aten.mkldnn_convolution.default not in ops
    with torch.inference_mode():
        torch.testing.assert_close(program.module()(x), net(x), rtol=1e-4, atol=1e-4)


def test_cpu_inference_swaps_for_the_block_and_nests():
    net = _net(3, padding="same", norm="instance").eval()
    plain = _classes(net)
    with cpu_inference(net):
        converted = _classes(net)
        assert converted != plain and type(net).__name__ == "_CPUUNet"
        with cpu_inference(nn.Sequential(net)):  # the same U-Net inside a wrapper
            assert _classes(net) == converted
        assert _classes(net) == converted  # the inner exit leaves the outer one's conversion
    assert _classes(net) == plain
    with pytest.raises(RuntimeError, match="inside"), cpu_inference(net):
        raise RuntimeError("inside")
    assert _classes(net) == plain
    with cpu_inference(lambda x: x), cpu_inference(None):  # not a module: nothing to do
        pass


def test_cpu_inference_leaves_a_network_converted_for_good_converted():
    net = for_cpu_inference(_net(2, padding="valid"))
    converted = _classes(net)
    with cpu_inference(net):
        pass
    assert _classes(net) == converted
    other = _net(2, padding="valid")
    with cpu_inference(other):
        for_cpu_inference(other)  # made permanent while a block is open
    assert _classes(other) == converted
