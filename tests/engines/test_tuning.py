from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from monai.inferers import SimpleInferer

from pipelines.engines import tune_membrane_watershed


class Logits(torch.nn.Module):
    """Two-channel logits whose softmax gives membrane probability = the input image."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        p = x.clamp(1e-4, 1 - 1e-4)
        return torch.cat([torch.log(p), torch.log(1 - p)], dim=1)


def test_ranks_combinations_and_writes_csv(tmp_path):
    truth = np.ones((40, 41), np.float32)
    truth[:, 19:22] = 0
    membrane = np.where(truth == 0, 0.9, 0.05).astype(np.float32)
    membrane[18:22, 19:22] = 0.6  # a weak stretch: a threshold above 0.6 opens a gap there
    cases = [{"image": membrane[None], "label": truth[None]}]
    grid = {"threshold": [0.5, 0.7], "seed_threshold": [0.2], "min_seed_size": [20], "sigma": [0.0]}
    rows = tune_membrane_watershed(cases, lambda d: d, Logits(), SimpleInferer(), grid, tmp_path / "tuning.csv")
    assert [r["threshold"] for r in rows] == [0.5, 0.7]  # 0.7 opens the weak stretch: worse, ranked second
    best = rows[0]
    assert best["pixel_error"] + best["rand_error"] <= rows[1]["pixel_error"] + rows[1]["rand_error"]
    assert best["pixel_error"] == pytest.approx(0.0, abs=1e-6)  # threshold 0.5 keeps the weak stretch
    with open(tmp_path / "tuning.csv") as f:
        written = list(csv.DictReader(f))
    assert [float(r["threshold"]) for r in written] == [r["threshold"] for r in rows]
    assert set(written[0]) == {"min_seed_size", "seed_threshold", "sigma", "threshold", "pixel_error", "rand_error"}


def test_bounded_pixel_error_ranks_by_rand_error():
    truth = np.ones((40, 41), np.float32)
    truth[:, 19:22] = 0
    membrane = np.where(truth == 0, 0.9, 0.05).astype(np.float32)
    cases = [{"image": membrane[None], "label": truth[None]}]
    grid = {"threshold": [0.5, 0.95], "seed_threshold": [0.2], "min_seed_size": [20], "sigma": [0.0]}
    rows = tune_membrane_watershed(cases, lambda d: d, Logits(), SimpleInferer(), grid, max_pixel_error=0.01)
    # threshold 0.95 calls every pixel cell: pixel error 3/41, over the bound, so it ranks last
    assert [r["threshold"] for r in rows] == [0.5, 0.95] and rows[1]["pixel_error"] > 0.01
