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


# ---- the brain's foreground on inputs as real sites send them -------------------------------------


def _demo_channels() -> np.ndarray:
    """The four channels of a demo case (raw scanner values, Rician noise in the air), every second voxel."""
    import json

    import nibabel as nib

    from tests.conftest import REPO

    manifest = REPO / "data_manifests" / "demo_brain.json"
    if not (REPO / "demo_brain" / "brats").is_dir():
        pytest.skip("demo_brain/ not generated (make demo-brain)")
    entry = json.loads(manifest.read_text())["validation"][0]
    return np.stack([np.asarray(nib.load(REPO / "demo_brain" / p).dataobj, np.float32)[::2, ::2, ::2]
                     for p in entry["image"]])


def _normalised_elsewhere(image: np.ndarray, brain: np.ndarray, background: str) -> np.ndarray:
    """``image`` as another pipeline leaves it: z-scored within ``brain``, the rest one constant (each
    channel's minimum, as BraTS 2013 does, or 0)."""
    out = np.empty_like(image)
    for c, channel in enumerate(image):
        z = (channel - channel[brain].mean()) / channel[brain].std()
        out[c] = np.where(brain, z, z[brain].min() - 0.5 if background == "minimum" else 0.0)
    return out


def test_the_same_brain_gives_the_same_network_input_however_it_arrives():
    """A demo case as the scanner wrote it, scaled otherwise per channel (another site's scanner),
    skull-stripped (background 0), z-scored within the brain by another pipeline (background at the
    minimum or at 0, half the brain negative), and that again scaled and shifted: one network input."""
    from pipelines.transforms import ChannelsNormalize

    raw = _demo_channels()
    normalize = ChannelsNormalize()
    brain = normalize.foreground(torch.from_numpy(raw)).numpy()
    assert 0.05 < brain.mean() < 0.6
    expected = normalize(torch.from_numpy(raw)).numpy()
    scale = np.array([3.7, 0.02, 120.0, 1.0], np.float32)[:, None, None, None]
    zscored = _normalised_elsewhere(raw, brain, "minimum")
    assert (zscored[:, brain] < 0).mean() > 0.3
    variants = {
        "another scanner scale": raw * scale,
        "skull-stripped": np.where(brain, raw, 0.0),
        "z-scored, background at the minimum": zscored,
        "z-scored, background at 0": _normalised_elsewhere(raw, brain, "zero"),
        "z-scored, then scaled and shifted": zscored * 5.0 - 2.0,
    }
    for name, image in variants.items():
        image = torch.from_numpy(image.astype(np.float32))
        assert np.array_equal(normalize.foreground(image).numpy(), brain), name
        np.testing.assert_allclose(normalize(image).numpy(), expected, atol=2e-4, err_msg=name)


def test_a_brain_mask_given_is_the_foreground():
    from pipelines.transforms import ChannelsNormalize, ChannelsNormalized

    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.normal(100, 20, (2, 12, 12, 12)).astype(np.float32))
    mask = torch.zeros(1, 12, 12, 12, dtype=torch.bool)
    mask[0, 2:9, 3:10, 1:11] = True
    out = ChannelsNormalized("image", mask_key="brain_mask")({"image": image, "brain_mask": mask})["image"]
    assert torch.equal(out != 0, mask.expand(2, -1, -1, -1))
    assert torch.allclose(out[0][mask[0]].mean(), torch.tensor(0.0), atol=1e-5)
    assert torch.equal(ChannelsNormalize().foreground(image, mask), mask[0])
    # without the key in the data, the rules apply (no constant background, all bright: everything)
    assert (ChannelsNormalized("image", mask_key="brain_mask")({"image": image})["image"] != 0).all()


@pytest.mark.parametrize("case", ["brats_2013_pat0005_1", "brats_2013_pat0006_1"])
def test_real_brats_2013_cases_keep_their_whole_brain(case):
    """Real glioma MR already z-scored within the brain by an earlier pipeline (background at the
    minimum, half the brain negative): the foreground is the brain mask shipped with them."""
    import nibabel as nib

    from pipelines.transforms import ChannelsNormalize
    from tests.conftest import shared_data_dir

    folder = shared_data_dir() / "brats2013_dev" / case
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (the shared data's brats2013_dev)")
    image = torch.from_numpy(np.stack([np.asarray(nib.load(folder / f"{name}_subtrMeanDivStd.nii.gz").dataobj,
                                                  np.float32) for name in ("Flair", "T1c")]))
    brain = np.asarray(nib.load(folder / "brainmask.nii.gz").dataobj) > 0
    normalize = ChannelsNormalize()
    assert normalize.constant_background(image) == [float(image[0].min()), float(image[1].min())]
    foreground = normalize.foreground(image).numpy()
    assert foreground[brain].mean() >= 0.99 and foreground[~brain].mean() <= 0.01
    # what the earlier rule (15 % of the positive 99th percentile) kept: a fraction of the brain
    relative = ChannelsNormalize(min_background=0.999).foreground(image).numpy()
    assert relative[brain].mean() < 0.5
