from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from PIL import Image

from pipelines.engines import ValidationOverlays


def test_validation_overlays_show_the_most_labelled_slice(tmp_path):
    def case(name: str, z: int) -> dict:
        image = MetaTensor(torch.rand(1, 10, 12, 7), meta={"filename_or_obj": f"/data/{name}.nii.gz"})
        label = torch.zeros(1, 10, 12, 7)
        label[0, 2:6, 3:8, z] = 1
        return {"image": image, "label": label, "pred": label.clone()}

    batches = [[case("a", 5)], [case("b", 1)], [case("c", 3)]]
    evaluator = Engine(lambda e, batch: batch)
    ValidationOverlays(tmp_path, max_cases=2).attach(evaluator)
    evaluator.run(batches, max_epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_001_a.png", "epoch_001_b.png"]
    picture = np.asarray(Image.open(tmp_path / "epoch_001_a.png"))
    assert picture.shape == (12, 10 + 4 + 10, 3)  # (Y, X) panels: reference | gap | prediction
    left, right = picture[:, :10], picture[:, 14:]
    np.testing.assert_array_equal(left, right)  # prediction equals reference here
    coloured = (left[..., 0].astype(int) - left[..., 2]) > 30
    assert coloured.sum() == 4 * 5  # exactly the labelled square of slice 5


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_cases"):
        ValidationOverlays("x", max_cases=0)
