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


def test_tumor_bundle_trains_with_amp_on_cuda(tmp_path):
    """The 3D bundle on CUDA: AMP on (its config enables it with CUDA), one epoch with validation."""
    import subprocess
    import sys

    from pipelines.demo import write_demo_data
    from tests.conftest import REPO

    write_demo_data(tmp_path / "data", tmp_path / "m.json", split={"training": 2, "validation": 1}, dicom=False)
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--meta_file", "configs/metadata.json",
         "--config_file", "configs/train.json", "--logging_file", "configs/logging.conf",
         "--dataset_dir", str(tmp_path / "data"), "--manifest", str(tmp_path / "m.json"),
         "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"),
         "--max_epochs", "1", "--val_interval", "1", "--cache_workers", "0"],
        cwd=REPO / "bundles" / "unet3d_tumor", capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    checkpoint = torch.load(next((tmp_path / "models").glob("last_checkpoint_*.pt")), weights_only=False)
    assert all(t.device.type == "cuda" for t in checkpoint["model"].values())
    assert checkpoint["grad_scaler"]["scale"] > 0  # the AMP loss scale is resumed too


def test_batch_job_on_cuda_matches_cpu(tmp_path):
    import json

    from pipelines.batch import run_batch
    from tests.batch.conftest import BUNDLE, DEMO, demo_case

    study = DEMO / demo_case("test", 0)["dicom"]
    records = {}
    for device in ("cpu", "cuda"):
        summary = run_batch(BUNDLE, study, tmp_path / device, device=device, workers=1)
        assert summary.done == 1
        (record,) = [json.loads(p.read_text()) for p in (tmp_path / device).glob("*/record.json")]
        records[device] = record
    assert records["cuda"]["settings"]["device"].startswith("cuda")
    for name, volume in records["cpu"]["volumes_ml"].items():
        assert abs(records["cuda"]["volumes_ml"][name] - volume) <= 0.01 * max(volume, 1.0)
