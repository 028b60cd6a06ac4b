from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from pipelines.transforms import RandCoarseElastic, RandCoarseElasticd


def constant_shift(transform, dims, axis, pixels):
    field = np.zeros((dims,) + (transform.grid_size,) * dims, dtype=np.float32)
    field[axis] = pixels
    transform.displacements = field
    transform._do_transform = True


@pytest.mark.parametrize("dims,axis", [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)])
def test_known_displacement_moves_the_right_axis(dims, axis):
    image = torch.arange(np.prod((9, 10, 11)[:dims]), dtype=torch.float32).reshape(1, *(9, 10, 11)[:dims])
    t = RandCoarseElastic(mode="nearest")
    constant_shift(t, dims, axis, 2.0)
    out = t(image, randomize=False)
    # output[i] samples input[i + 2] along `axis` (inside the image)
    src = [slice(None)] * (dims + 1)
    dst = [slice(None)] * (dims + 1)
    src[axis + 1] = slice(2, None)
    dst[axis + 1] = slice(0, -2)
    assert torch.equal(out[tuple(dst)], image[tuple(src)])


def test_zero_sigma_is_identity():
    image = torch.rand(2, 17, 23)
    assert torch.allclose(RandCoarseElastic(sigma=0.0)(image), image, atol=1e-5)


def test_seeded_runs_repeat_and_differ_between_seeds():
    image = torch.rand(1, 32, 32)
    a = RandCoarseElastic().set_random_state(5)(image)
    b = RandCoarseElastic().set_random_state(5)(image)
    c = RandCoarseElastic().set_random_state(6)(image)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_displacement_statistics_follow_the_paper():
    t = RandCoarseElastic(grid_size=3, sigma=10.0).set_random_state(0)
    draws = []
    for _ in range(400):
        t.randomize(2)
        draws.append(t.displacements)
    draws = np.stack(draws)
    assert draws.shape == (400, 2, 3, 3)
    assert draws.std() == pytest.approx(10.0, rel=0.05) and abs(draws.mean()) < 0.5


def test_dictionary_uses_one_field_for_all_keys():
    image = torch.rand(1, 40, 40)
    labels = (image > 0.5).float()
    d = RandCoarseElasticd(keys=["image", "copy", "label"], mode=["bilinear", "bilinear", "nearest"], sigma=8.0)
    d.set_random_state(3)
    out = d({"image": image, "copy": image.clone(), "label": labels})
    assert torch.equal(out["image"], out["copy"])
    assert not torch.allclose(out["image"], image)
    assert set(out["label"].unique().tolist()) <= {0.0, 1.0}
    # nearest-neighbour label warping picks the value of the same source pixel as the image
    warped_threshold = RandCoarseElastic(mode="nearest").set_random_state(0)
    warped_threshold.displacements = d.elastic.displacements
    warped_threshold._do_transform = True
    assert torch.equal(warped_threshold(image, randomize=False) > 0.5, out["label"] > 0.5)


def test_probability_zero_and_metadata():
    image = MetaTensor(torch.rand(1, 8, 8), meta={"filename_or_obj": "x"})
    assert RandCoarseElastic(prob=0.0)(image) is image
    out = RandCoarseElastic()(image)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "x"


def test_bad_arguments():
    with pytest.raises(ValueError, match="`grid_size` must be >= 2"):
        RandCoarseElastic(grid_size=1)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        RandCoarseElastic(mode="bicubic")
    with pytest.raises(ValueError, match="2 or 3 spatial axes"):
        RandCoarseElastic()(torch.zeros(1, 8))
