"""CUDA checks, run on a GPU machine (``pytest -m gpu``); ``make test`` deselects them."""

from __future__ import annotations

import pytest
import torch

from pipelines.inference import OverlapTileInferer
from pipelines.losses import WeightedCrossEntropyLoss
from pipelines.networks import UNet

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dims,padding", [(2, "valid"), (3, "same")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_training_step(dims, padding, dtype):
    torch.manual_seed(0)
    net = UNet(dims, 1, 2, features=(8, 16, 32), padding=padding, norm="instance").cuda()
    size = (60, 68, 44)[:dims] if padding == "valid" else (33, 34, 35)[:dims]
    x = torch.randn(2, 1, *size, device="cuda")
    out_shape = net.output_shape(size)
    target = torch.cat([torch.randint(0, 2, (2, 1, *out_shape)), torch.ones(2, 1, *out_shape)], 1).float().cuda()
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    optimizer = torch.optim.Adam(net.parameters())
    with torch.autocast("cuda", dtype=dtype):
        logits = net(x)
        loss = WeightedCrossEntropyLoss()(logits, target)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert logits.dtype == dtype and torch.isfinite(loss)
    with torch.no_grad():
        reference = net(x)  # float32
        with torch.autocast("cuda", dtype=dtype):
            assert torch.allclose(net(x).float(), reference, atol=0.05, rtol=0.05)


def test_overlap_tile_on_cuda_equals_cpu():
    torch.manual_seed(0)
    net = UNet(3, 1, 2, features=(4, 8, 16)).eval()
    x = torch.randn(1, 1, 41, 37, 29)
    inferer = OverlapTileInferer(16, sw_batch_size=4)
    with torch.no_grad():
        cpu = inferer(x, net)
        gpu = inferer(x.cuda(), net.cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)


def test_blended_windows_on_gpu_stitched_on_cpu():
    from pipelines.inference import BlendedSlidingWindowInferer

    torch.manual_seed(0)
    net = UNet(3, 1, 2, features=(4, 8, 16), padding="same", norm="batch").eval()
    x = torch.randn(1, 1, 45, 40, 33)
    cpu = BlendedSlidingWindowInferer(24, autocast=False)(x, net)
    split = BlendedSlidingWindowInferer(24, sw_device="cuda", device="cpu", autocast=False)(x, net.cuda())
    assert split.device.type == "cpu" and torch.allclose(split, cpu, atol=1e-4)
    half = BlendedSlidingWindowInferer(24, sw_device="cuda", device="cpu", autocast=True, accumulate_dtype="float16")(x, net)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), cpu, atol=0.05, rtol=0.05)
