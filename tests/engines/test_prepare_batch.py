from __future__ import annotations

import pytest
import torch

from pipelines.engines import PrepareBatchWithWeights


def test_packs_label_and_weight():
    batch = {"image": torch.rand(2, 1, 8, 8), "label": torch.ones(2, 1, 6, 6), "weight": torch.full((2, 1, 6, 6), 3.0)}
    image, target = PrepareBatchWithWeights()(batch, device="cpu")
    assert torch.equal(image, batch["image"])
    assert target.shape == (2, 2, 6, 6)
    assert torch.equal(target[:, 0], batch["label"][:, 0]) and torch.equal(target[:, 1], batch["weight"][:, 0])


def test_errors_name_the_problem():
    with pytest.raises(KeyError, match=r"no key\(s\) \['weight'\]"):
        PrepareBatchWithWeights()({"image": torch.zeros(1), "label": torch.zeros(1)})
    bad = {"image": torch.zeros(1, 1, 4, 4), "label": torch.zeros(1, 1, 4, 4), "weight": torch.zeros(1, 1, 2, 2)}
    with pytest.raises(ValueError, match="'weight' .* must have the shape of 'label'"):
        PrepareBatchWithWeights()(bad)
