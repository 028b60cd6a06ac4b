"""Channels of a study on one grid: known rigid movements found within a millimetre at the brain's
surface (MNI152 anatomy, another contrast, another grid, noise); aligned channels left alone;
a channel that cannot be aligned refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from pipelines.demo.synthetic import _rotation, load_template
from pipelines.transforms.registration import RegisterToReferenced, RegistrationError, register_rigid, resample_to


@pytest.fixture(scope="module")
def anatomy():
    """The MNI152 T1 at 2 mm as the reference, the template itself and the brain's surface points (RAS mm)."""
    template = load_template()
    affine = template.affine.copy()
    affine[:3, :3] *= 2
    t1 = template.t1[::2, ::2, ::2]
    brain = (template.gm + template.wm)[::2, ::2, ::2] > 0.5
    surface = np.argwhere(brain & ~ndimage.binary_erosion(brain)).T
    points = affine @ np.vstack([surface, np.ones(surface.shape[1])])
    reference = MetaTensor(torch.from_numpy(t1[None].astype(np.float32)), affine=torch.from_numpy(affine),
                           meta={"filename_or_obj": "t1"})
    return template, reference, points


def _movement(reference, angles_deg, shift_mm) -> np.ndarray:
    """RAS matrix rotating about the reference's centre, then shifting."""
    affine = np.asarray(reference.affine, dtype=np.float64)
    center = affine[:3, :3] @ (np.asarray(reference.shape[1:]) - 1) / 2 + affine[:3, 3]
    matrix = np.eye(4)
    matrix[:3, :3] = _rotation(np.radians(angles_deg))
    matrix[:3, 3] = center + np.asarray(shift_mm) - matrix[:3, :3] @ center
    return matrix


def _t2_like(template, movement: np.ndarray, spacing: float = 2.5, seed: int = 0) -> MetaTensor:
    """The anatomy moved by ``movement``, on its own grid of ``spacing`` mm, with the brain's contrast
    inverted (T2-like) and Rician noise."""
    shape = np.ceil(np.asarray(template.t1.shape) / spacing).astype(int)
    affine = template.affine.copy()
    affine[:3, :3] = np.diag(np.sign(np.diag(template.affine[:3, :3])) * spacing)
    world = affine @ np.vstack([np.indices(shape).reshape(3, -1), np.ones(int(np.prod(shape)))])
    source = np.linalg.inv(template.affine) @ np.linalg.inv(movement) @ world
    t1 = ndimage.map_coordinates(template.t1, source[:3], order=1).reshape(shape)
    brain = ndimage.map_coordinates(template.gm + template.wm, source[:3], order=1).reshape(shape)
    image = np.where(brain > 0.3, 1.3 - t1, 0.3 * t1)
    rng = np.random.default_rng(seed)
    image = np.abs(image + rng.normal(0, 0.03, shape) + 1j * rng.normal(0, 0.03, shape))
    return MetaTensor(torch.from_numpy(image[None].astype(np.float32)), affine=torch.from_numpy(affine),
                      meta={"filename_or_obj": "t2"})


@pytest.mark.parametrize("angles, shift", [((4, -3, 5), (3, -4, 2.5)), ((8, 2, -6), (-6, 5, 4))])
def test_a_moved_channel_is_found_within_a_millimetre_at_the_brain_surface(anatomy, angles, shift):
    template, reference, points = anatomy
    movement = _movement(reference, angles, shift)
    data = RegisterToReferenced(["t1", "t2"], "t1")({"t1": reference, "t2": _t2_like(template, movement)})
    found = data["t2"].meta["registration"]
    residual = np.linalg.norm((np.asarray(found["matrix"]) @ points - movement @ points)[:3], axis=0)
    assert residual.max() <= 1.0, f"{residual.max():.2f} mm at the brain surface"
    assert found["kept"] and found["mutual_information_after"] > found["mutual_information_before"]
    assert found["rotation_deg"] == pytest.approx(np.degrees(np.arccos((np.trace(movement[:3, :3]) - 1) / 2)), abs=0.5)
    assert data["t2"].shape == reference.shape and torch.equal(data["t2"].affine, reference.affine)
    assert data["t1"] is reference
    # the aligned channel now matches the reference voxel for voxel: the brain's contrast is inverted
    brain = (template.gm + template.wm)[::2, ::2, ::2] > 0.5
    aligned = np.corrcoef(np.asarray(data["t2"][0])[brain], np.asarray(reference[0])[brain])[0, 1]
    unaligned = np.corrcoef(np.asarray(resample_to(_t2_like(template, movement), reference)[0])[brain],
                            np.asarray(reference[0])[brain])[0, 1]
    assert aligned < -0.8 and aligned < unaligned - 0.2


def test_an_aligned_channel_is_left_where_patient_coordinates_put_it(anatomy):
    template, reference, points = anatomy
    result = register_rigid(reference, _t2_like(template, np.eye(4), seed=1))
    assert not result.kept and np.array_equal(result.matrix, np.eye(4))
    assert result.mutual_information_before > 0.3


def test_only_resampling_keeps_patient_coordinates(anatomy):
    template, reference, _ = anatomy
    moved = _t2_like(template, _movement(reference, (5, 0, 0), (0, 0, 0)))
    data = RegisterToReferenced("t2", "t1", register=False)({"t1": reference, "t2": moved})
    assert data["t2"].meta["registration"] == {"reference": "t1", "kept": False, "registered": False, "same_grid": False}
    assert torch.equal(data["t2"].affine, reference.affine) and data["t2"].shape == reference.shape
    # resampling a volume onto its own grid gives it back
    again = resample_to(reference, reference)
    assert torch.allclose(again.as_tensor(), reference.as_tensor(), atol=1e-5)


def test_a_channel_that_cannot_be_aligned_is_refused_by_name(anatomy):
    _, reference, _ = anatomy
    affine = reference.affine.clone()
    affine[:3, :3] *= 2
    noise = MetaTensor(torch.rand(1, 30, 35, 30, generator=torch.Generator().manual_seed(0)), affine=affine,
                       meta={"filename_or_obj": "/data/other_patient/flair"})
    with pytest.raises(RegistrationError, match=r"/data/other_patient/flair: channel 'flair' cannot be aligned with "
                                                r"'t1': mutual information 0\.0\d+ after rigid registration"):
        RegisterToReferenced("flair", "t1")({"t1": reference, "flair": noise})
    with pytest.raises(KeyError, match="reference key 't1'"):
        RegisterToReferenced("flair", "t1")({"flair": noise})


def test_auto_registers_other_grids_and_keeps_channels_on_the_reference_grid(anatomy):
    """BraTS-layout files share the reference grid and are co-registered by their distributor: "auto"
    leaves them untouched; a series on its own grid is registered."""
    template, reference, points = anatomy
    same_grid = MetaTensor(reference.as_tensor() * 0.5, affine=reference.affine.clone(), meta={"filename_or_obj": "t1c"})
    movement = _movement(reference, (4, -3, 5), (3, -4, 2.5))
    data = RegisterToReferenced(["t1", "t1c", "t2"], "t1", register="auto")(
        {"t1": reference, "t1c": same_grid, "t2": _t2_like(template, movement)})
    assert data["t1c"] is same_grid
    assert data["t1c"].meta["registration"] == {"reference": "t1", "kept": False, "registered": False, "same_grid": True}
    found = data["t2"].meta["registration"]
    assert found["registered"] and found["kept"]
    residual = np.linalg.norm((np.asarray(found["matrix"]) @ points - movement @ points)[:3], axis=0)
    assert residual.max() <= 1.0
    # two DICOM series on one grid (a 3D T1 and T1c of one protocol): the patient may have moved between them
    series = {"t1": MetaTensor(reference.as_tensor(), affine=reference.affine.clone(),
                               meta={"filename_or_obj": "t1", "series_instance_uid": "1.2.3"}),
              "t1c": MetaTensor(same_grid.as_tensor(), affine=reference.affine.clone(),
                                meta={"filename_or_obj": "t1c", "series_instance_uid": "1.2.4"})}
    found = RegisterToReferenced(["t1", "t1c"], "t1", register="auto")(series)["t1c"].meta["registration"]
    assert found["registered"] and not found["kept"]  # registered, and nothing to correct
    with pytest.raises(ValueError, match="`register` must be true, false or 'auto'"):
        RegisterToReferenced(["t1"], "t1", register="yes")
