from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from pipelines.inference import OverlapTileInferer, mirror_indices
from pipelines.networks import UNet


class BoxFilterNet(nn.Module):
    """A valid network with a known answer: the mean over a (2m+1)^d box, times ``scale``."""

    def __init__(self, dims: int, margin: int, factor: int = 4, scale: float = 2.0) -> None:
        super().__init__()
        self.dims, self.margin, self.downsample_factor, self.scale = dims, margin, factor, scale

    def output_shape(self, shape):
        return tuple(s - 2 * self.margin for s in shape)

    def valid_input_shape(self, shape):
        return tuple(s + 2 * self.margin for s in shape)

    def forward(self, x):
        k = 2 * self.margin + 1
        pool = F.avg_pool2d if self.dims == 2 else F.avg_pool3d
        return self.scale * pool(x, k, stride=1)


def whole_pass(net: UNet, x: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
    """One forward pass over the whole image, mirror-padded with numpy to a valid size."""
    spatial = x.shape[2:]
    size = net.valid_input_shape(spatial)
    margin = [(i - o) // 2 for i, o in zip(size, net.output_shape(size))]
    pads = [(0, 0), (0, 0)] + [(m, s - m - n) for m, s, n in zip(margin, size, spatial)]
    padded = torch.from_numpy(np.pad(x.numpy(), pads, mode=mode))
    out = net(padded)
    return out[(slice(None), slice(None), *[slice(0, n) for n in spatial])]


@pytest.mark.parametrize(
    "dims,features,size,tile,batch",
    [
        (2, (4, 8, 16), (75, 83), 30, 2),
        (2, (4, 8, 16, 32), (97, 61), 40, 1),
        (3, (2, 4, 8), (37, 29, 31), 12, 2),
        (3, (2, 4, 8), (9, 10, 11), 64, 1),  # smaller than one tile
    ],
)
@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_stitched_equals_whole_pass(dims, features, size, tile, batch, sw_batch_size):
    torch.manual_seed(0)
    net = UNet(dims, 2, 3, features=features).eval()
    x = torch.randn(batch, 2, *size)
    inferer = OverlapTileInferer(tile, sw_batch_size=sw_batch_size)
    with torch.no_grad():
        stitched = inferer(x, net)
        reference = whole_pass(net, x)
    assert stitched.shape == (batch, 3, *size)
    assert torch.allclose(stitched, reference, atol=1e-5)


def test_plan_tiles_are_aligned_and_do_not_overlap():
    net = UNet(2, 1, 2)
    plan = OverlapTileInferer(388).plan(net, (512, 1000))
    assert plan.input_tile == (572, 572) and plan.output_tile == (388, 388)
    assert plan.margin == (92, 92)
    assert plan.stride == (384, 384)  # a multiple of 16 = the pooling grid of a whole-image pass
    assert plan.counts == (2, 3) and plan.num_tiles == 6
    small = OverlapTileInferer(388).plan(net, (100, 20))
    assert small.output_tile[0] >= 100 and small.counts == (1, 1)


@pytest.mark.parametrize(
    "mode,scipy_mode", [("reflect", "mirror"), ("symmetric", "reflect"), ("replicate", "nearest"), ("constant", "constant")]
)
@pytest.mark.parametrize("dims", [2, 3])
def test_known_answer_and_padding_modes(mode, scipy_mode, dims):
    """A box filter stitched over tiles equals scipy's filter with the matching border mode."""
    rng = np.random.default_rng(0)
    size = (23, 17, 11)[:dims]
    image = rng.normal(size=size).astype(np.float32)
    net = BoxFilterNet(dims, margin=3)
    result = OverlapTileInferer(5, padding_mode=mode, sw_batch_size=4)(torch.from_numpy(image)[None, None], net)
    expected = 2.0 * ndimage.uniform_filter(image.astype(np.float64), size=7, mode=scipy_mode, cval=0.0)
    np.testing.assert_allclose(result[0, 0].numpy(), expected, atol=1e-5)


def test_identity_predictor_is_exact():
    net = BoxFilterNet(2, margin=0, scale=1.0)
    net.output_shape = lambda s: tuple(n - 2 for n in s)  # context 1, output = centre crop
    net.valid_input_shape = lambda s: tuple(n + 2 for n in s)
    net.forward = lambda x: x[..., 1:-1, 1:-1] * 2.0
    x = torch.randn(2, 3, 31, 45)
    assert torch.equal(OverlapTileInferer(8)(x, net), 2.0 * x)


@pytest.mark.parametrize("length", [1, 2, 5])
@pytest.mark.parametrize("before,after", [(0, 0), (3, 2), (11, 13)])
@pytest.mark.parametrize("mode,np_mode", [("reflect", "reflect"), ("symmetric", "symmetric"), ("replicate", "edge")])
def test_mirror_indices_match_numpy(length, before, after, mode, np_mode):
    values = np.arange(length)
    if np_mode == "reflect" and length == 1:
        np_mode = "edge"  # numpy reflects a single value onto itself
    expected = np.pad(values, (before, after), mode=np_mode)
    assert mirror_indices(length, before, after, mode).tolist() == expected.tolist()


def test_metatensor_in_metatensor_out():
    net = BoxFilterNet(2, margin=2)
    x = MetaTensor(torch.randn(1, 1, 20, 20), meta={"filename_or_obj": "slice.png"})
    out = OverlapTileInferer(8)(x, net)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "slice.png"


def test_progress_callback():
    calls = []
    net = BoxFilterNet(2, margin=2)
    inferer = OverlapTileInferer(8, sw_batch_size=3, progress=lambda done, total: calls.append((done, total)))
    inferer(torch.randn(2, 1, 20, 20), net)  # 3 x 3 tiles of 8 per image, 2 images: 18 tiles
    assert calls == [(3, 18), (6, 18), (9, 18), (12, 18), (15, 18), (18, 18)]


def test_refuses_networks_it_cannot_tile():
    with pytest.raises(TypeError, match="needs a network with .*output_shape"):
        OverlapTileInferer(8)(torch.zeros(1, 1, 16, 16), nn.Identity())
    with pytest.raises(ValueError, match="needs a valid .*sliding-window"):
        OverlapTileInferer(8)(torch.zeros(1, 1, 16, 16), UNet(2, 1, 2, features=(4, 8), padding="same"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tile_size": 0}, "`tile_size` must be a positive int"),
        ({"tile_size": 8, "sw_batch_size": 0}, "`sw_batch_size` must be a positive int"),
        ({"tile_size": 8, "padding_mode": "wrap"}, "`padding_mode` must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OverlapTileInferer(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"inputs must be a tensor \(B, C, \*spatial\)"):
        OverlapTileInferer(8)(torch.zeros(16, 16), BoxFilterNet(2, 1))
