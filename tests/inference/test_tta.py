from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer

from pipelines.inference import OverlapTileInferer, TTAInferer, tta_transforms
from pipelines.networks import UNet


@pytest.mark.parametrize("mode,axes,count", [("mirror", (0, 1), 4), ("mirror", (0, 1, 2), 8), ("dihedral", (0, 1), 8)])
def test_transforms_are_distinct_and_inverted(mode, axes, count):
    x = torch.arange(2 * 3 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4, 4)
    pairs = tta_transforms(mode, axes)
    assert len(pairs) == count
    images = {tuple(forward(x).flatten().tolist()) for forward, _ in pairs}
    assert len(images) == count  # no transform repeats another
    for forward, inverse in pairs:
        assert torch.equal(inverse(forward(x)), x)


@pytest.mark.parametrize("mode", ["mirror", "dihedral"])
def test_equivariant_predictor_is_unchanged(mode):
    x = torch.randn(2, 1, 9, 9)
    network = lambda t: torch.cat([t * 2.0, -t], dim=1)  # pixel-wise: commutes with flips and rotations
    out = TTAInferer(SimpleInferer(), mode=mode)(x, network)
    assert torch.allclose(out, network(x), atol=1e-6)


def test_averages_what_is_not_equivariant():
    x = torch.zeros(1, 1, 4, 6)
    ramp = lambda t: t + torch.arange(6, dtype=torch.float32)  # depends on the column index
    out = TTAInferer(SimpleInferer(), mode="mirror", axes=(1,))(x, ramp)
    assert torch.allclose(out, torch.full_like(x, 2.5))  # mean of the ramp and its mirror


def test_wraps_overlap_tile_on_non_square_images():
    torch.manual_seed(0)
    net = UNet(2, 1, 2, features=(4, 8, 16)).eval()
    x = MetaTensor(torch.randn(1, 1, 50, 37), meta={"filename_or_obj": "a.png"})
    with torch.no_grad():
        out = TTAInferer(OverlapTileInferer(24), mode="dihedral")(x, net)
    assert out.shape == (1, 2, 50, 37) and isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "a.png"


def test_bad_arguments():
    with pytest.raises(ValueError, match="`mode` must be one of"):
        TTAInferer(SimpleInferer(), mode="rotate")
    with pytest.raises(ValueError, match="name 2 spatial axes for mode 'dihedral'"):
        TTAInferer(SimpleInferer(), mode="dihedral", axes=(0, 1, 2))(torch.zeros(1, 1, 4, 4, 4), lambda t: t)
    with pytest.raises(ValueError, match="`axes` must index the 2 spatial axes"):
        TTAInferer(SimpleInferer(), axes=(2,))(torch.zeros(1, 1, 4, 4), lambda t: t)
