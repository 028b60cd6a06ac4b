from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from pipelines.transforms import ModalityNormalize, ModalityNormalized


def test_ct_window_clips_and_scales():
    image = torch.tensor([[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]])
    out = ModalityNormalize("CT", window=(-160, 240))(image)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.0, 0.5, 1.0, 1.0]]]))


def test_mr_z_score_within_the_foreground_keeps_air_at_zero():
    torch.manual_seed(0)
    head = torch.randn(1, 8, 8, 8) * 50 + 400
    image = torch.zeros(2, 16, 8, 8)
    image[:, :8] = head
    image[1, :8] *= 3  # a second channel with other units
    image = MetaTensor(image, meta={"filename_or_obj": "x.nii.gz"})
    out = ModalityNormalized("image", modality="MR")({"image": image})["image"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "x.nii.gz"
    for c in range(2):
        inside = out[c, :8]
        assert inside.mean().abs() < 1e-5 and (inside.std() - 1).abs() < 1e-4
        assert (out[c, 8:] == 0).all()


def test_empty_image_and_bad_options():
    assert (ModalityNormalize("MR")(torch.zeros(1, 4, 4)) == 0).all()
    with pytest.raises(ValueError, match="modality"):
        ModalityNormalize("XR")
    with pytest.raises(ValueError, match="window"):
        ModalityNormalize("CT", window=(100, -100))
