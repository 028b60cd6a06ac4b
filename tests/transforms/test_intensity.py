from __future__ import annotations

import numpy as np
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


def test_channels_z_scored_within_the_foreground_they_share():
    """Four MR channels with Rician background noise: the shared foreground is the brain (not the
    noise, not a channel's dark CSF), each channel has mean 0 and std 1 there, and the rest is 0."""
    from pipelines.transforms import ChannelsNormalize, ChannelsNormalized

    rng = np.random.default_rng(0)
    shape = (24, 24, 24)
    brain = np.zeros(shape, bool)
    brain[4:20, 4:20, 4:20] = True
    csf = np.zeros(shape, bool)
    csf[10:14, 10:14, 10:14] = True
    levels = [(0.8, 0.15), (0.8, 0.15), (0.4, 1.0), (0.45, 0.08)]  # (tissue, CSF) for T1, T1c, T2, FLAIR
    image = np.stack([np.where(csf, c, np.where(brain, t, 0.0)) * 2000 for t, c in levels])
    noise = 60 * (rng.standard_normal(image.shape) + 1j * rng.standard_normal(image.shape))
    image = np.abs(image + noise).astype(np.float32)
    normalize = ChannelsNormalize()
    mask = normalize.foreground(torch.from_numpy(image)).numpy()
    assert mask[brain].mean() == 1.0 and mask[~brain].mean() < 0.001  # CSF is dark on FLAIR yet inside
    out = ChannelsNormalized("image")({"image": torch.from_numpy(image)})["image"].numpy()
    for channel in out:
        assert channel[mask].mean() == pytest.approx(0.0, abs=1e-5) and channel[mask].std() == pytest.approx(1.0, abs=1e-3)
        assert not channel[~mask].any()
    # skull-stripped data (zeros outside the brain) take the brain exactly
    stripped = np.where(brain, image, 0.0).astype(np.float32)
    assert np.array_equal(normalize.foreground(torch.from_numpy(stripped)).numpy(), brain)
    with pytest.raises(ValueError, match="`fraction` must be in"):
        ChannelsNormalize(1.5)
