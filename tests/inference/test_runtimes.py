"""The OpenVINO runtime: torch's results within float rounding through the project's own inferers,
one conversion per bundle, shape and OpenVINO version, kept on disk; runtimes refused by name."""

from __future__ import annotations

import ctypes

import pytest
import torch

from pipelines.inference import BlendedSlidingWindowInferer, OverlapTileInferer, TTAInferer
from pipelines.inference.runtimes import OpenVinoNetwork, check_runtime, inferer_window, on_runtime
from pipelines.networks import UNet
from pipelines.runtime import CoreShare

openvino = pytest.importorskip("openvino", reason="OpenVINO not installed (the openvino extra)")


def test_the_openvino_network_gives_torchs_windows_and_blending(tmp_path):
    torch.manual_seed(0)
    net = UNet(3, 2, 3, features=(4, 8), padding="same", norm="instance").eval()
    image = torch.randn(1, 2, 40, 36, 28)
    inferer = BlendedSlidingWindowInferer(roi_size=16, overlap=0.5, sw_batch_size=3, mode="gaussian")
    on_openvino = OpenVinoNetwork(net, "bundle-a", "tiny", cache=tmp_path)
    with torch.no_grad():
        expected = inferer(image, net)
    found = inferer(image, on_openvino)
    assert torch.allclose(found, expected, atol=1e-4), (found - expected).abs().max()
    assert sorted(on_openvino._compiled) == [((3, 2, 16, 16, 16), torch.get_num_threads())]  # the last batch filled up
    assert on_openvino.converted == 1 and len(list(tmp_path.glob("tiny-*.xml"))) == 1


def test_a_valid_network_keeps_its_window_geometry_on_openvino(tmp_path):
    """The paper's valid U-Net in 2D through the overlap-tile inferer, which reads the network's output
    shape for each tile: the same output on OpenVINO."""
    torch.manual_seed(1)
    net = UNet(2, 1, 2, features=(4, 8, 16), padding="valid").eval()
    image = torch.randn(1, 1, 96, 80)
    inferer = OverlapTileInferer(tile_size=44, sw_batch_size=2)
    with torch.no_grad():
        expected = inferer(image, net)
    found = inferer(image, OpenVinoNetwork(net, "valid", cache=tmp_path))
    assert found.shape == expected.shape and torch.allclose(found, expected, atol=1e-4)


def test_the_window_is_what_the_network_is_handed():
    """A sliding window's roi; a valid network's input tile for the overlap-tile inferer's output tile
    (through test-time augmentation), the shape an int8 model is calibrated on and checked against."""
    valid = UNet(2, 1, 2, features=(4, 8, 16), padding="valid")
    tiles = OverlapTileInferer(tile_size=[44, 44])
    assert inferer_window(TTAInferer(tiles, mode="dihedral"), valid) == valid.valid_input_shape((44, 44)) != (44, 44)
    image = torch.randn(1, 1, 96, 80)
    assert tiles.plan(valid, image.shape[2:]).input_tile == inferer_window(tiles, valid)
    assert inferer_window(tiles) == (44, 44)  # no network: the inferer's own words
    same = UNet(3, 1, 2, features=(4, 8), padding="same")
    assert inferer_window(BlendedSlidingWindowInferer(roi_size=[16, 16, 16]), same) == (16, 16, 16)


def test_a_converted_model_is_read_back_until_the_bundle_or_the_shape_changes(tmp_path):
    torch.manual_seed(2)
    net = UNet(3, 1, 2, features=(4, 8), padding="same", norm="instance").eval()
    window = torch.randn(1, 1, 16, 16, 16)
    first = OpenVinoNetwork(net, "bundle-hash-1", "b", cache=tmp_path)
    out = first(window)
    again = OpenVinoNetwork(net, "bundle-hash-1", "b", cache=tmp_path)
    assert torch.equal(again(window), out) and again.converted == 0  # read from the cache
    other = OpenVinoNetwork(net, "bundle-hash-2", "b", cache=tmp_path)  # other weights or configs
    other(window)
    other(torch.randn(2, 1, 16, 16, 16))  # another shape
    assert other.converted == 2 and len(list(tmp_path.glob("b-*.xml"))) == 3
    assert first.file((1, 1, 16, 16, 16)) != other.file((1, 1, 16, 16, 16))
    assert not list(tmp_path.glob(".*"))  # no partial file left


class _Busy:
    """A machine whose other processes keep ``cores`` cores busy."""

    def __init__(self, cores: float) -> None:
        self.busy = cores

    def cores(self) -> float:
        return self.busy


def test_the_runtime_takes_the_cores_the_job_and_the_machine_leave_it(tmp_path):
    """In the batch job the runtime's module is served by a CoreShare: with one core busy elsewhere it
    runs on one thread (a model compiled for that count, the conversion read from the cache), and on
    all of them again when the core is free; the results do not change."""
    torch.manual_seed(3)
    net = UNet(3, 1, 2, features=(4, 8), padding="same", norm="instance").eval()
    window = torch.randn(1, 1, 16, 16, 16)
    module = on_runtime(net, "openvino", "bundle-threads", "t")
    module.runner.cache = tmp_path
    cores = CoreShare(2, watch_machine=False)
    cores.machine = _Busy(0.2)
    with cores.serving(module):
        idle = module(window)
        cores.machine.busy = 1.1
        loaded = module(window)
        cores.machine.busy = 0.0
        module(window)
    assert sorted(module.runner._compiled) == [((1, 1, 16, 16, 16), 1), ((1, 1, 16, 16, 16), 2)]
    assert module.runner.converted == 1 and torch.allclose(idle, loaded, atol=1e-4)


def test_runtimes_are_refused_by_name():
    with pytest.raises(ValueError, match="runtime 'onnx': expected one of torch, openvino"):
        check_runtime("onnx", torch.device("cpu"))
    with pytest.raises(ValueError, match="runs on the CPU; device cuda:0 keeps the 'torch' runtime"):
        check_runtime("openvino", torch.device("cuda:0"))
    net = torch.nn.Conv3d(1, 1, 1)
    assert on_runtime(net, "torch", "k") is net and isinstance(on_runtime(net, "openvino", "k").runner, OpenVinoNetwork)


def _signal_stack() -> tuple[int, int, int]:
    from pipelines.inference.runtimes import _SignalStack

    found = _SignalStack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(found)) == 0
    return found.ss_sp or 0, found.ss_flags, found.ss_size


def test_compiled_models_freed_in_any_order_leave_the_threads_signal_stack_as_it_was(tmp_path):
    """OpenVINO's compile puts its own signal stack on the thread and restores the one it found when
    the model is freed; freed first-made-first, the thread was left a freed stack and the next SIGCHLD
    killed the process (pytest's faulthandler had put a stack there)."""
    import gc
    import subprocess
    import sys

    before = _signal_stack()
    net = UNet(3, 1, 2, features=(4, 8), padding="same").eval()
    first, second = (OpenVinoNetwork(net, key, cache=tmp_path) for key in ("a", "b"))
    first(torch.zeros(1, 1, 8, 8, 8))
    second(torch.zeros(1, 1, 8, 8, 8))
    assert _signal_stack() == before
    del first
    gc.collect()
    del second
    gc.collect()
    assert _signal_stack() == before
    assert subprocess.run([sys.executable, "-c", "pass"], check=True).returncode == 0  # its SIGCHLD is handled
