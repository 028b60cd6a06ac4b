from __future__ import annotations

import pytest
import torch

from pipelines.engines import load_weights, save_weights
from pipelines.networks import UNet


def test_round_trip_and_ddp_style_wrapper(tmp_path):
    net = UNet(2, 1, 2, features=(4, 8))
    wrapper = torch.nn.Module()
    wrapper.module = net  # what DistributedDataParallel exposes
    path = save_weights(wrapper, tmp_path / "models" / "model.pt")
    other = load_weights(UNet(2, 1, 2, features=(4, 8)), path)
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_weights(UNet(2, 1, 2, features=(4, 8)), tmp_path / "model.pt")
    before = path.read_bytes()

    def broken_save(obj, target):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_weights(UNet(2, 1, 2, features=(4, 8)), path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_weights(UNet(2, 1, 2, features=(4, 8)), tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt: not a readable PyTorch weights file"):
        load_weights(UNet(2, 1, 2, features=(4, 8)), garbage)
    other = save_weights(UNet(2, 1, 2, features=(4, 16)), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: weights do not fit UNet"):
        load_weights(UNet(2, 1, 2, features=(4, 8)), other)
