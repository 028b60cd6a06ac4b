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


@pytest.mark.parametrize("dims", [2, 3])
def test_fine_tuning_on_a_channel_subset_keeps_those_channels_input_weights(tmp_path, dims):
    """Weights trained on T1, T1c, T2, FLAIR start a network on FLAIR and T1c: its first convolution
    holds the FLAIR and T1c columns in that order, every other tensor as trained; a bundle's
    checkpoint (``{"model": state}``) reads the same."""
    from pipelines.engines import load_pretrained

    four = UNet(dims, 4, 3, features=(4, 8, 16), padding="same", norm="instance").eval()
    torch.save({"model": four.state_dict()}, tmp_path / "model.pt")
    two = load_pretrained(UNet(dims, 2, 3, features=(4, 8, 16), padding="same", norm="instance").eval(),
                          tmp_path / "model.pt", ["t2f", "t1c"], ["t1n", "t1c", "t2w", "t2f"])
    trained, tuned = four.state_dict(), two.state_dict()
    first = next(name for name, t in tuned.items() if t.ndim >= 3)
    assert torch.equal(tuned[first], trained[first][:, [3, 1]])
    assert all(torch.equal(tuned[name], trained[name]) for name in tuned if name != first)
    x = torch.randn(1, 4, *(16,) * dims)
    with torch.no_grad():  # the same function of the channels kept, the others zero
        assert torch.allclose(two(x[:, [3, 1]]), four(x * torch.tensor([0, 1, 0, 1.0]).view(1, 4, *(1,) * dims)),
                              atol=1e-5)
    assert load_pretrained(four, None) is four


def test_fine_tuning_refuses_what_the_weights_cannot_start(tmp_path):
    from pipelines.engines import load_pretrained

    torch.save(UNet(3, 4, 3, features=(4, 8)).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt: trained on the channels \['t1n', 't1c', 't2w', 't2f'\], "
                                         r"not on \['dwi'\]"):
        load_pretrained(UNet(3, 2, 3, features=(4, 8)), tmp_path / "model.pt", ["t2f", "dwi"],
                        ["t1n", "t1c", "t2w", "t2f"])
    with pytest.raises(ValueError, match=r"model\.pt: the pretrained weights do not fit the network \(.*"
                                         r"encoder\.0\.conv1\.weight: \(4, 4, 3, 3, 3\) in the weights, \(16, 4, 3, 3, 3\) in the network"):
        load_pretrained(UNet(3, 4, 3, features=(16, 32)), tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_pretrained(UNet(3, 4, 3, features=(4, 8)), tmp_path / "missing.pt")
