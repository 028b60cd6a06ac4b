from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pipelines.losses import WeightedCrossEntropyLoss


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_unit_weights_equal_cross_entropy(spatial):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, *spatial)
    labels = torch.randint(0, 3, (2, 1, *spatial)).float()
    ones = torch.ones_like(labels)
    expected = F.cross_entropy(logits, labels[:, 0].long())
    loss = WeightedCrossEntropyLoss()
    assert torch.allclose(loss(logits, labels), expected)
    assert torch.allclose(loss(logits, torch.cat([labels, ones], 1)), expected)


def test_weights_scale_each_pixel():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[[0.0, 0.0]], [[3.0, 0.5]]]])  # class 0 at both pixels, weights 3 and 0.5
    per_pixel = -torch.log_softmax(logits, dim=1)[0, 0, 0]  # -log p(class 0)
    loss = WeightedCrossEntropyLoss(reduction="none")(logits, target)
    assert torch.allclose(loss[0, 0], per_pixel * torch.tensor([3.0, 0.5]))
    assert torch.allclose(WeightedCrossEntropyLoss()(logits, target), (per_pixel * torch.tensor([3.0, 0.5])).mean())
    assert torch.allclose(WeightedCrossEntropyLoss("sum")(logits, target), (per_pixel * torch.tensor([3.0, 0.5])).sum())


def test_gradient_flows_only_where_weighted():
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    target = torch.zeros(1, 2, 4, 4)
    target[:, 1, :2] = 1.0  # weight 1 in the top half, 0 below
    WeightedCrossEntropyLoss()(logits, target).backward()
    assert logits.grad[..., :2, :].abs().sum() > 0 and logits.grad[..., 2:, :].abs().sum() == 0


def test_shape_errors():
    loss = WeightedCrossEntropyLoss()
    with pytest.raises(ValueError, match=r"target must have shape \(B, 1 or 2, \*spatial\)"):
        loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="must match the input's batch and spatial shape"):
        loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="`reduction` must be"):
        WeightedCrossEntropyLoss("max")
