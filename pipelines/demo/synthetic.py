"""Synthetic tumor cases on real anatomy: the MNI152 2009 T1 template shipped inside nilearn.

Each case is the template seen through a random affine and a smooth elastic deformation, resampled
to a random scanner grid, with one or two inserted lesions (label 1, a textured tumor, sometimes
with a dark necrotic centre) each inside a rim of edema (label 2), then a multiplicative bias field,
a contrast (gamma) change and noise. Labels are exact: image and label are painted from the same
masks on the output grid. Everything is drawn from ``numpy.random.default_rng(seed)``, so a seed
gives the same case on every machine.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["LABELS", "FollowUp", "SyntheticCase", "load_template", "make_case", "make_follow_up"]

LABELS = {"background": 0, "tumor": 1, "edema": 2}

_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


@dataclass
class Template:
    """The MNI152 2009c T1 and grey/white-matter maps ``(X, Y, Z)`` on their 1 mm RAS grid."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    affine: np.ndarray


@dataclass
class SyntheticCase:
    """One case: ``image`` (float32, 0-4095 scanner units) and ``label`` (uint8), ``(X, Y, Z)``."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray  # RAS, voxel to mm
    lesions: int


def load_template() -> Template:
    """The template files inside the installed nilearn package (read in place, no download)."""
    import nibabel as nib

    folder = importlib.resources.files("nilearn.datasets") / "data"
    maps = {}
    for name in ("t1", "gm", "wm"):
        with importlib.resources.as_file(folder / _TEMPLATE.format(name)) as path:
            image = nib.load(path)
            maps[name] = np.asarray(image.dataobj, dtype=np.float32) / 255.0
            affine = image.affine
    return Template(maps["t1"], maps["gm"], maps["wm"], np.asarray(affine, dtype=float))


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], control: int) -> np.ndarray:
    """Zero-mean noise of unit amplitude, smooth at the scale of ``shape / control``."""
    coarse = rng.standard_normal((control,) * len(shape))
    zoom = [s / control for s in shape]
    field = ndimage.zoom(coarse, zoom, order=3, mode="nearest")[tuple(slice(0, s) for s in shape)]
    return field / (np.abs(field).max() + 1e-6)


def _grid(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World coordinates ``(3, X, Y, Z)`` of every voxel of a grid."""
    index = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3] @ index + affine[:3, 3:4]
    return world.reshape(3, *shape).astype(np.float32)


def _centre(template: Template) -> np.ndarray:
    """The centre of the template's grid, in mm."""
    return template.affine[:3, :3] @ (np.array(template.t1.shape) / 2.0) + template.affine[:3, 3]


def _scanner_grid(rng: np.random.Generator, template: Template, centre: np.ndarray):
    """A random axial scanner grid over the head (in-plane spacing 2.0-2.6 mm, slices 2.5-3.5 mm),
    centred on ``centre`` within 4 mm: ``(spacing, shape, affine, world coordinates)``."""
    in_plane, slice_spacing = rng.uniform(2.0, 2.6), rng.uniform(2.5, 3.5)
    spacing = np.array([in_plane, in_plane, slice_spacing])
    extent = np.array(template.t1.shape) * np.abs(np.diag(template.affine)[:3])  # mm
    shape = tuple(int(v) for v in np.ceil((extent * 0.92) / spacing))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = centre - spacing * (np.array(shape) - 1) / 2.0 + rng.uniform(-4, 4, size=3)
    return spacing, shape, affine, _grid(shape, affine)


def _sample(template: Template, source: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The template's T1 and tissue maps at the points ``source`` ``(3, X, Y, Z)`` (mm), and the brain
    mask they give."""
    inverse = np.linalg.inv(template.affine)
    voxels = np.tensordot(inverse[:3, :3], source, axes=1) + inverse[:3, 3][:, None, None, None]
    sample = {name: ndimage.map_coordinates(getattr(template, name), voxels, order=1, mode="constant", cval=0.0)
              for name in ("t1", "gm", "wm")}
    return sample, ndimage.binary_fill_holes((sample["gm"] + sample["wm"]) > 0.4)


def _lesion(rng, world: np.ndarray, brain: np.ndarray, wm: np.ndarray, spacing: float):
    """Masks ``(tumor, edema, necrosis)`` of one lesion and its texture, on the output grid."""
    candidates = np.argwhere(ndimage.binary_erosion(wm > 0.5, iterations=max(1, int(12 / spacing))))
    if len(candidates) == 0:
        candidates = np.argwhere(brain)
    centre_index = candidates[rng.integers(len(candidates))]
    centre = world[(slice(None), *centre_index)]
    radii = rng.uniform(11.0, 22.0) * rng.uniform(0.75, 1.25, size=3)
    axes = _rotation(rng.uniform(-np.pi, np.pi, size=3))
    offset = np.tensordot(axes.T, world - centre[:, None, None, None], axes=1)  # lesion frame, mm
    distance = np.sqrt(((offset / radii[:, None, None, None]) ** 2).sum(0))  # 1 on the ellipsoid
    lobes = _smooth_field(rng, brain.shape, control=max(3, int(brain.shape[0] * spacing / 25)))
    shape_field = distance * (1.0 + 0.35 * lobes)
    tumor = (shape_field < 1.0) & brain
    spread = _smooth_field(rng, brain.shape, control=max(3, int(brain.shape[0] * spacing / 20)))
    edema_field = distance * (1.0 + 0.3 * spread) / rng.uniform(1.6, 2.3)
    edema = (edema_field < 1.0) & brain & ~tumor & (rng.random() < 0.9)
    necrosis = tumor & (shape_field < rng.uniform(0.3, 0.55)) & (rng.random() < 0.5)
    return tumor, edema, necrosis


def make_case(template: Template, seed: int) -> SyntheticCase:
    """One synthetic case; ``seed`` fixes everything about it.

    The scanner grid is axial with in-plane spacing 2.0-2.6 mm and slice spacing 2.5-3.5 mm,
    covering the head with a margin; intensities are scanner-like units in 0-4095.
    """
    rng = np.random.default_rng(seed)
    centre_world = _centre(template)
    spacing, shape, affine, world = _scanner_grid(rng, template, centre_world)

    # the anatomy seen through a random rotation, scaling and smooth deformation
    rotation = _rotation(np.deg2rad(rng.uniform(-8, 8, size=3))) * rng.uniform(0.92, 1.08)
    source = np.tensordot(rotation, world - centre_world[:, None, None, None], axes=1) + centre_world[:, None, None, None]
    for axis in range(3):
        source[axis] += 4.0 * _smooth_field(rng, shape, control=4)
    sample, brain = _sample(template, source)

    label = np.zeros(shape, dtype=np.uint8)
    image = sample["t1"].astype(np.float32)
    wm_level = float(np.median(image[sample["wm"] > 0.8])) if (sample["wm"] > 0.8).any() else 0.8
    lesions = int(rng.integers(1, 3))
    for _ in range(lesions):
        tumor, edema, necrosis = _lesion(rng, world, brain, sample["wm"], float(spacing.min()))
        texture = 1.0 + 0.12 * _smooth_field(rng, shape, control=max(4, shape[0] // 6))
        brightness = rng.uniform(1.25, 1.6) * wm_level
        edema_level = rng.uniform(0.55, 0.75)
        image = np.where(edema & (label == 0), image * edema_level * texture, image)
        image = np.where(tumor, brightness * texture, image)
        image = np.where(necrosis, rng.uniform(0.25, 0.45) * wm_level * texture, image)
        label[edema & (label == 0)] = LABELS["edema"]
        label[tumor] = LABELS["tumor"]

    return SyntheticCase(_scanner_effects(rng, image), label, affine, lesions)


def _scanner_effects(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A multiplicative bias field, a contrast (gamma) change and noise, scaled to 12-bit units."""
    bias = np.exp(0.2 * _smooth_field(rng, image.shape, control=3))
    image = np.clip(image * bias, 0.0, None) ** rng.uniform(0.8, 1.25)
    image = image + rng.uniform(0.015, 0.04) * rng.standard_normal(image.shape)
    image = np.clip(image, 0.0, None) * rng.uniform(1800, 2600)
    return np.clip(image, 0, 4095).astype(np.float32)


@dataclass
class FollowUp:
    """One patient scanned twice: ``baseline`` and ``follow_up`` (another day, another position in
    the scanner, another grid). Lesion 1 is in both, larger at follow-up (each radius times
    ``growth``); lesion 2 appears at follow-up (the new one), in the other hemisphere. ``pose``: the
    RAS matrix (mm) mapping a point of the baseline scanner's coordinates to the same anatomical point
    in the follow-up scanner's coordinates. ``lesion_labels``: per visit, the tumor label map with each
    lesion numbered (1: the growing one, 2: the new one), for the true per-lesion volumes."""

    baseline: SyntheticCase
    follow_up: SyntheticCase
    pose: np.ndarray
    growth: float
    lesion_labels: tuple[np.ndarray, np.ndarray]


def make_follow_up(template: Template, seed: int, growth: float = 1.2) -> FollowUp:
    """A patient with two studies (see :class:`FollowUp`); ``seed`` fixes everything, as in
    :func:`make_case`, whose intensities (texture, bias field, contrast, noise) each visit has.

    The anatomy is the template through one random rotation and scaling (no elastic field, so both
    visits show the same brain); lesions are ellipsoids fixed in the patient's anatomy, each in a
    rim of edema; the follow-up sees the patient rotated by 3-5 degrees and moved 6-10 mm.
    """
    rng = np.random.default_rng(seed)
    centre = _centre(template)
    anatomy = _rotation(np.deg2rad(rng.uniform(-8, 8, size=3))) * rng.uniform(0.95, 1.05)
    # lesion centres: deep white matter of the template, one per hemisphere, in the patient's frame
    wm = ndimage.binary_erosion(template.wm > 0.5, iterations=14)
    candidates = template.affine[:3, :3] @ np.argwhere(wm).T + template.affine[:3, 3:4]
    to_patient = np.linalg.inv(anatomy)
    lesions = []
    for side, size in ((-1, (18.0, 21.0)), (1, (14.0, 17.0))):
        pool = candidates[:, (candidates[0] - centre[0]) * side > 20]
        point = pool[:, rng.integers(pool.shape[1])]
        lesions.append((to_patient @ (point - centre) + centre, rng.uniform(*size) * rng.uniform(0.85, 1.15, 3),
                        _rotation(rng.uniform(-np.pi, np.pi, size=3)), rng.uniform(1.6, 2.0)))
    rotation = _rotation(np.deg2rad(rng.uniform(3, 5) * rng.choice([-1, 1], size=3) / np.sqrt(3)))
    direction = rng.standard_normal(3)
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = centre - rotation @ centre + direction / np.linalg.norm(direction) * rng.uniform(6, 10)
    grown = [(lesions[0][0], lesions[0][1] * growth, *lesions[0][2:])]
    visits = [_visit(template, rng, centre, anatomy, np.eye(4), lesions[:1]),
              _visit(template, rng, centre, anatomy, pose, [*grown, lesions[1]])]
    return FollowUp(visits[0][0], visits[1][0], pose, growth, (visits[0][1], visits[1][1]))


def _visit(template: Template, rng, centre: np.ndarray, anatomy: np.ndarray, pose: np.ndarray,
           lesions: list) -> tuple[SyntheticCase, np.ndarray]:
    """One study of :func:`make_follow_up`: the case and its lesions numbered in order."""
    _, shape, affine, world = _scanner_grid(rng, template, centre)
    inverse_pose = np.linalg.inv(pose)  # scanner point -> the patient's point (baseline coordinates)
    patient = np.tensordot(inverse_pose[:3, :3], world, axes=1) + inverse_pose[:3, 3][:, None, None, None]
    source = np.tensordot(anatomy, patient - centre[:, None, None, None], axes=1) + centre[:, None, None, None]
    sample, brain = _sample(template, source)
    label = np.zeros(shape, dtype=np.uint8)
    numbered = np.zeros(shape, dtype=np.uint8)
    image = sample["t1"].astype(np.float32)
    wm_level = float(np.median(image[sample["wm"] > 0.8])) if (sample["wm"] > 0.8).any() else 0.8
    for number, (point, radii, axes, edema_scale) in enumerate(lesions, start=1):
        offset = np.tensordot(axes.T, patient - point[:, None, None, None], axes=1)
        distance = np.sqrt(((offset / radii[:, None, None, None]) ** 2).sum(0))
        tumor = (distance < 1.0) & brain
        edema = (distance < edema_scale) & brain & ~tumor & (label == 0)
        texture = 1.0 + 0.12 * _smooth_field(rng, shape, control=max(4, shape[0] // 6))
        image = np.where(edema, image * rng.uniform(0.55, 0.75) * texture, image)
        image = np.where(tumor, rng.uniform(1.25, 1.6) * wm_level * texture, image)
        label[edema] = LABELS["edema"]
        label[tumor] = LABELS["tumor"]
        numbered[tumor] = number
    return SyntheticCase(_scanner_effects(rng, image), label, affine, len(lesions)), numbered
