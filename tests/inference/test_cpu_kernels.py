"""The inferers run a U-Net on the CPU with its CPU inference kernels and leave it as they found it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pipelines.inference import BlendedSlidingWindowInferer, OverlapTileInferer, TTAInferer
from pipelines.networks import UNet, for_cpu_inference

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def _cases() -> list[tuple[str, UNet, object, torch.Tensor]]:
    torch.manual_seed(0)
    same = UNet(3, 1, 2, features=(4, 8, 16), padding="same", norm="instance").eval()
    valid = UNet(2, 1, 2, features=(4, 8, 16)).eval()
    return [
        ("blended 3D", same, BlendedSlidingWindowInferer(16, overlap=0.25), torch.rand(1, 1, 27, 30, 21)),
        ("overlap-tile 2D", valid, OverlapTileInferer(24, sw_batch_size=2), torch.rand(2, 1, 50, 61)),
        ("TTA over blended", same, TTAInferer(BlendedSlidingWindowInferer(16), axes=(0,)), torch.rand(1, 1, 20, 17, 19)),
    ]


class _Plain:
    """A callable, not a module, that runs ``net`` as it is (no kernels swapped) and tiles like it."""

    def __init__(self, net: UNet) -> None:
        self.net = net
        self.output_shape, self.valid_input_shape = net.output_shape, net.valid_input_shape
        self.downsample_factor = net.downsample_factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _seen_classes(net: UNet) -> list[list[str]]:
    """Class names of the U-Net and its first block at each forward call (filled by a hook)."""
    seen: list[list[str]] = []
    net.register_forward_pre_hook(lambda m, args: seen.append([type(m).__name__, type(m.encoder[0]).__name__]))
    return seen


@pytest.mark.parametrize("name", [c[0] for c in _cases()])
def test_inferers_use_the_cpu_kernels_for_the_call_only(name):
    _, net, inferer, x = next(c for c in _cases() if c[0] == name)
    classes = [type(m) for m in net.modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    parameters = list(net.parameters())
    plain = copy.deepcopy(net)
    seen = _seen_classes(net)
    with torch.no_grad():  # an evaluator's setting; the blended inferer enters inference mode itself
        result = inferer(x, net)
        reference = inferer(x, _Plain(plain))  # not a module: the plain layers
    assert seen and all(s == ["_CPUUNet", "_CPUDoubleConv"] for s in seen)
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    assert [type(m) for m in net.modules()] == classes  # as found
    assert all(a is b for a, b in zip(net.parameters(), parameters, strict=True))
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_inferers_leave_the_network_plain_when_it_fails():
    _, net, inferer, x = _cases()[0]
    classes = [type(m) for m in net.modules()]
    calls = []

    def fail_on_the_second_window(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")

    net.register_forward_pre_hook(fail_on_the_second_window)
    with pytest.raises(RuntimeError, match="out of memory"):
        inferer(x, net)
    assert [type(m) for m in net.modules()] == classes


def test_a_network_converted_for_good_stays_converted():
    _, net, inferer, x = _cases()[1]
    for_cpu_inference(net)
    classes = [type(m) for m in net.modules()]
    with torch.no_grad():
        inferer(x, net)
    assert [type(m) for m in net.modules()] == classes


def test_the_tumor_bundle_inference_config_runs_the_cpu_kernels():
    """``python -m monai.bundle run`` builds the network and the inferer separately: the inferer swaps."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "unet3d_tumor" / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLES / "unet3d_tumor")
    net, inferer = parser.get_parsed_content("network"), parser.get_parsed_content("inferer")
    assert isinstance(net, UNet) and type(net) is UNet
    net.load_state_dict(torch.load(BUNDLES / "unet3d_tumor" / "models" / "model.pt", weights_only=True))
    seen = _seen_classes(net.eval())
    with torch.inference_mode():
        inferer(torch.rand(1, 1, 40, 36, 33), net)
    assert seen and all(s == ["_CPUUNet", "_CPUDoubleConv"] for s in seen) and type(net) is UNet


def test_a_network_on_another_device_is_not_converted():
    """The kernels are swapped in only where the network runs on the CPU (here: the meta device)."""
    _, net, _, x = _cases()[0]
    net = net.to("meta")
    seen = _seen_classes(net)
    inferer = BlendedSlidingWindowInferer(16, sw_device="meta", device="cpu", reuse_memory=False)
    with pytest.raises(Exception):  # noqa: B017 - the meta device cannot be stitched; only the classes matter
        inferer(x, net)
    assert seen == [["UNet", "_DoubleConv"]]
