from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from scipy import ndimage

from pipelines.inference import BlendedSlidingWindowInferer, even_starts
from pipelines.networks import UNet
from tests.inference.test_overlap_tile import BoxFilterNet

double = lambda t: 2.0 * t  # noqa: E731 - a predictor with a known answer


@pytest.mark.parametrize("dims,size,roi", [(2, (37, 29), 16), (3, (37, 29, 23), 16), (3, (9, 10, 11), 16), (2, (16, 16), 16)])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("padding_mode", ["reflect", "constant"])
def test_known_answer_is_reproduced(dims, size, roi, mode, padding_mode):
    x = torch.randn(2, 3, *size)
    out = BlendedSlidingWindowInferer(roi, overlap=0.5, mode=mode, padding_mode=padding_mode, sw_batch_size=3)(x, double)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.allclose(out, 2.0 * x, atol=1e-5)


@pytest.mark.parametrize("accumulate", ["float16", "bfloat16"])
def test_half_precision_accumulation(accumulate):
    x = torch.randn(1, 2, 40, 33, 21)
    out = BlendedSlidingWindowInferer(16, accumulate_dtype=accumulate)(x, double)
    assert out.dtype == getattr(torch, accumulate)
    tolerance = 0.01 if accumulate == "float16" else 0.05
    assert torch.allclose(out.float(), 2.0 * x, atol=tolerance * 8, rtol=tolerance)


def test_streaming_equals_in_memory_and_leaves_no_file(tmp_path):
    x = torch.randn(1, 2, 41, 30, 19)
    net = UNet(3, 2, 3, features=(4, 8), padding="same", norm="batch").eval()
    in_memory = BlendedSlidingWindowInferer(16)(x, net)
    streamed = BlendedSlidingWindowInferer(16, streaming_dir=tmp_path)(x, net)
    assert torch.allclose(streamed, in_memory, atol=1e-6)
    assert os.listdir(tmp_path) == []


def test_constant_mode_equals_monai_on_the_same_layout():
    """Sizes of roi + k * step: MONAI's windows and the even placement coincide."""
    torch.manual_seed(0)
    net = UNet(3, 1, 2, features=(4, 8), padding="same", norm="batch").eval()
    x = torch.randn(2, 1, 40, 32, 24)  # 16 + 8k with roi 16, overlap 0.5
    assert even_starts(40, 16, 0.5) == [0, 8, 16, 24]
    with torch.no_grad():
        expected = sliding_window_inference(x, (16, 16, 16), 4, net, overlap=0.5, mode="constant")
    ours = BlendedSlidingWindowInferer(16, overlap=0.5, mode="constant")(x, net)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_gaussian_at_least_as_faithful_as_monai():
    torch.manual_seed(1)
    net = UNet(3, 1, 2, features=(4, 8, 16), padding="same", norm="batch").eval()
    x = torch.randn(1, 1, 64, 56, 40)
    with torch.no_grad():
        whole = net(x)
        monai = sliding_window_inference(x, (32, 32, 32), 4, net, overlap=0.5, mode="gaussian")
    ours = BlendedSlidingWindowInferer(32, overlap=0.5, mode="gaussian")(x, net)
    ours_error = (ours - whole).abs().mean().item()
    monai_error = (monai - whole).abs().mean().item()
    assert ours_error <= monai_error * 1.001, (ours_error, monai_error)


@pytest.mark.parametrize("tta_axes", [(0,), (0, 1, 2)])
def test_tta_with_an_equivariant_predictor_changes_nothing(tta_axes):
    x = torch.randn(1, 2, 20, 17, 15)
    plain = BlendedSlidingWindowInferer(8)(x, double)
    assert torch.allclose(BlendedSlidingWindowInferer(8, tta_axes=tta_axes)(x, double), plain, atol=1e-6)


def test_tta_averages_mirrored_predictions():
    x = torch.zeros(1, 1, 8, 8)
    ramp = lambda t: t + torch.arange(8, dtype=torch.float32)  # noqa: E731 - depends on the column
    out = BlendedSlidingWindowInferer(8, tta_axes=(1,))(x, ramp)
    assert torch.allclose(out, torch.full_like(x, 3.5))


def test_tuple_and_dict_outputs():
    x = torch.randn(2, 1, 21, 18)
    pair = BlendedSlidingWindowInferer(8)(x, lambda t: (2 * t, torch.cat([t, -t], 1)))
    assert isinstance(pair, tuple) and torch.allclose(pair[0], 2 * x, atol=1e-5)
    assert pair[1].shape == (2, 2, 21, 18) and torch.allclose(pair[1][:, 1:], -x, atol=1e-5)
    named = BlendedSlidingWindowInferer(8)(x, lambda t: {"seg": 3 * t, "aux": t})
    assert list(named) == ["seg", "aux"] and torch.allclose(named["seg"], 3 * x, atol=1e-5)


def test_valid_networks_use_their_input_and_output_windows():
    """A box filter is a valid network with a known answer: blended, it is scipy's filter."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(31, 26, 19)).astype(np.float32)
    out = BlendedSlidingWindowInferer(8, overlap=0.5)(torch.from_numpy(image)[None, None], BoxFilterNet(3, margin=2))
    expected = 2.0 * ndimage.uniform_filter(image.astype(np.float64), size=5, mode="mirror")
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-5)
    net = UNet(2, 1, 2, features=(4, 8)).eval()
    assert BlendedSlidingWindowInferer(20)(torch.randn(1, 1, 50, 45), net).shape == (1, 2, 50, 45)


def test_metadata_progress_and_devices():
    calls = []
    x = MetaTensor(torch.randn(1, 1, 24, 24), meta={"filename_or_obj": "a.nii.gz"})
    inferer = BlendedSlidingWindowInferer(16, overlap=0.5, sw_batch_size=2, sw_device="cpu", device="cpu",
                                          progress=lambda done, total: calls.append((done, total)))
    out = inferer(x, double)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "a.nii.gz"
    assert calls == [(2, 4), (4, 4)]  # 2 x 2 windows


@pytest.mark.parametrize("length,window,overlap", [(100, 16, 0.5), (97, 32, 0.25), (33, 32, 0.5), (64, 64, 0.5), (10, 16, 0.5)])
def test_even_placement(length, window, overlap):
    starts = even_starts(length, window, overlap)
    assert starts[0] == 0 and starts[-1] == max(length - window, 0)
    steps = np.diff(starts)
    if len(steps):
        assert steps.max() - steps.min() <= 1  # even
        assert steps.max() <= window * (1 - overlap) + 1  # at least the requested overlap (rounding)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"roi_size": 0}, "`roi_size` must be a positive int"),
        ({"roi_size": 8, "overlap": 1.0}, r"`overlap` must be in \[0, 1\)"),
        ({"roi_size": 8, "mode": "triangle"}, "`mode` must be one of"),
        ({"roi_size": 8, "padding_mode": "wrap"}, "`padding_mode` must be one of"),
        ({"roi_size": 8, "accumulate_dtype": "int8"}, "`accumulate_dtype` must be one of"),
        ({"roi_size": 8, "accumulate_dtype": "bfloat16", "streaming_dir": "."}, "numpy has no bfloat16"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlendedSlidingWindowInferer(**kwargs)


def test_bad_network_outputs():
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"network output 0 has spatial shape \(4, 4\), expected the window's \(8, 8\)"):
        BlendedSlidingWindowInferer(8)(x, lambda t: t[..., :4, :4])
    with pytest.raises(TypeError, match="must return a tensor, a tuple or a dict"):
        BlendedSlidingWindowInferer(8)(x, lambda t: "nope")


def mapping_rss_kib(prefix: str) -> int | None:
    """Resident KiB of this process's mapping of a (deleted) file whose name starts with ``prefix``."""
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        if prefix in line and "(deleted)" in line:
            for detail in lines[i + 1 :]:
                if detail.startswith("Rss:"):
                    return int(detail.split()[1])
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_streaming_releases_finished_rows_from_memory(tmp_path):
    x = torch.randn(1, 2, 256, 96, 80)  # output: 2 x 256 x 96 x 80 float32 = 15 MiB
    out = BlendedSlidingWindowInferer(32, streaming_dir=tmp_path)(x, double)
    resident = mapping_rss_kib("blended-")
    assert resident is not None, "the streamed output is not memory-mapped"
    assert resident < 1024, f"{resident} KiB of the streamed output stay in memory after inference"
    assert torch.allclose(out, 2.0 * x, atol=1e-5)  # the data is still there: read back from the page cache
    assert mapping_rss_kib("blended-") > 10_000
