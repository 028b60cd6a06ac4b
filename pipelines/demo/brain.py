"""Synthetic multi-parametric brain tumor studies on the MNI152 anatomy nilearn ships.

Each case is rendered from the template's grey and white matter maps (CSF where the brain holds
neither), moved by a per-case pose and deformed around each tumor (mass effect), with lesions in
the BraTS 2023 convention: 1 necrotic core (NCR: dark on T1, bright on T2, never enhancing), 2 edema
(ED: spreading along white matter, bright on T2 and FLAIR), 3 enhancing tumor (ET: a rim bright on
T1c only). Four sequences are rendered from each tissue's relative brightness in that sequence
(:data:`TISSUE_LEVELS`), each on its own acquisition grid (:data:`SEQUENCES`: T1 3D axial at 1 mm,
T1c 3D sagittal at 0.9 x 0.9 x 1 mm, T2 and FLAIR 2D axial at 0.7 x 0.7 x 4 mm, and a localizer and a
diffusion trace series that a study holds too), with a smooth bias field and Rician noise; a case may
have the patient moved between series (a rigid movement of the anatomy, recorded).

:func:`make_brain_case` gives the four acquisitions, the label on the reference (T1) grid and the
four channels on that grid as BraTS distributes them (co-registered, no movement).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from pipelines.demo.synthetic import Template, _grid, _rotation, _smooth_field

__all__ = ["BRATS_LABELS", "CHANNELS", "ORIENTATIONS", "SEQUENCES", "TISSUE_LEVELS", "Acquisition", "BrainCase", "make_brain_case"]

BRATS_LABELS = {"background": 0, "NCR": 1, "ED": 2, "ET": 3}

CHANNELS = ("t1n", "t1c", "t2w", "t2f")  # BraTS 2023 names: native T1, contrast-enhanced T1, T2, FLAIR

# relative brightness of each tissue in each sequence (and in the study's diffusion trace image)
TISSUE_LEVELS = {
    "t1n": {"wm": 0.80, "gm": 0.55, "csf": 0.15, "ncr": 0.22, "et": 0.50, "ed": 0.47},
    "t1c": {"wm": 0.80, "gm": 0.55, "csf": 0.15, "ncr": 0.22, "et": 1.05, "ed": 0.47},
    "t2w": {"wm": 0.40, "gm": 0.60, "csf": 1.00, "ncr": 0.92, "et": 0.66, "ed": 0.82},
    "t2f": {"wm": 0.45, "gm": 0.62, "csf": 0.08, "ncr": 0.55, "et": 0.72, "ed": 0.95},
    "dwi": {"wm": 0.50, "gm": 0.58, "csf": 0.12, "ncr": 0.25, "et": 0.62, "ed": 0.66},
}

# each series of a study: its contrast (a TISSUE_LEVELS key), voxel size in mm along the grid's
# axes (along a row, down a column, between slices) and orientation (:data:`ORIENTATIONS`); the
# localizer and the diffusion series are there to be ignored
SEQUENCES = {
    "t1n": ("t1n", (1.0, 1.0, 1.0), "axial"),
    "t1c": ("t1c", (0.9, 0.9, 1.0), "sagittal"),
    "t2w": ("t2w", (0.7, 0.7, 4.0), "axial"),
    "t2f": ("t2f", (0.7, 0.7, 4.0), "axial"),
    "localizer": ("t1n", (2.0, 2.0, 40.0), "axial"),
    "dwi": ("dwi", (2.0, 2.0, 5.0), "axial"),
}
# RAS direction of each grid axis (columns): axial rows run to the patient's left and columns to
# the back (as the DICOM writer flips them), slices upwards; sagittal rows run to the back, columns
# downwards, slices to the patient's right (ImageOrientationPatient 0\1\0\0\0\-1, along its normal)
ORIENTATIONS = {
    "axial": np.eye(3),
    "sagittal": np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
}
_FOV_MARGIN_MM = 8.0


@dataclass
class Acquisition:
    """One series: ``image`` (float32, 0-4095 scanner units, ``(X, Y, Z)``) on its RAS ``affine``
    (axial or sagittal, :data:`ORIENTATIONS`); ``movement`` the rigid RAS matrix that moved the
    anatomy since the reference series."""

    image: np.ndarray
    affine: np.ndarray
    movement: np.ndarray


@dataclass
class BrainCase:
    """One case: the acquisitions, the label and the four channels on the reference (T1) grid."""

    acquisitions: dict[str, Acquisition]
    label: np.ndarray
    channels: dict[str, np.ndarray]
    affine: np.ndarray
    tumors: int
    moved: bool
    notes: list[str] = field(default_factory=list)


def _canonical(template: Template) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Tissue maps cropped to the brain with a margin, and their affine."""
    brain = ndimage.binary_fill_holes((template.gm + template.wm) > 0.4)
    low, high = np.argwhere(brain).min(0) - 12, np.argwhere(brain).max(0) + 13
    low, high = np.maximum(low, 0), np.minimum(high, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    affine = template.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ low
    gm, wm = template.gm[box], template.wm[box]
    csf = np.clip(brain[box].astype(np.float32) - gm - wm, 0.0, 1.0)
    return {"gm": gm, "wm": wm, "csf": csf}, affine


def _tumor(rng, maps: dict[str, np.ndarray], centre: np.ndarray, radius: float, small: bool) -> tuple:
    """``(necrosis, enhancing, edema, displacement)`` of one tumor on the canonical grid (1 mm), in its box."""
    reach = int(np.ceil(radius * 3.2))
    low = np.maximum(np.round(centre).astype(int) - reach, 0)
    high = np.minimum(np.round(centre).astype(int) + reach + 1, maps["wm"].shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    shape = tuple(high - low)
    offset = np.indices(shape, dtype=np.float32) + low[:, None, None, None] - centre[:, None, None, None]
    axes = _rotation(rng.uniform(-np.pi, np.pi, size=3))
    radii = radius * rng.uniform(0.8, 1.2, size=3)
    local = np.tensordot(axes.T, offset, axes=1)
    distance = np.sqrt(((local / radii[:, None, None, None]) ** 2).sum(0))
    lumpy = distance * (1.0 + 0.22 * _smooth_field(rng, shape, control=4))
    core = lumpy < 1.0
    inner = 0.0 if small or rng.random() < 0.2 else rng.uniform(0.5, 0.75)
    necrosis = core & (lumpy < inner)
    enhancing = core & ~necrosis
    wm = maps["wm"][box]
    spread = rng.uniform(1.5, 1.9) if small else rng.uniform(1.6, 2.2)
    field_ = distance * (1.0 + 0.3 * _smooth_field(rng, shape, control=5))
    edema = ~core & (field_ < spread) & ((wm > 0.35) | (field_ < 1.25)) & ((wm + maps["gm"][box]) > 0.2)
    # mass effect: tissue pushed outwards, most near the tumor, fading within three radii
    r = np.sqrt((offset**2).sum(0)) + 1e-3
    push = 0.45 * radius * np.exp(-((r / (1.8 * radius)) ** 2)) * (0.0 if small else 1.0)
    displacement = offset / r * push
    return box, necrosis, enhancing, edema, displacement


def _sample(volume: np.ndarray, affine: np.ndarray, world: np.ndarray, order: int) -> np.ndarray:
    inverse = np.linalg.inv(affine)
    voxels = inverse[:3, :3] @ world + inverse[:3, 3:4]
    return ndimage.map_coordinates(volume, voxels, order=order, mode="constant", cval=0.0)


def _rigid(rng, centre: np.ndarray, degrees: float, mm: float) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = _rotation(np.deg2rad(rng.uniform(-degrees, degrees, size=3)))
    matrix[:3, 3] = centre + rng.uniform(-mm, mm, size=3) - matrix[:3, :3] @ centre
    return matrix


def make_brain_case(template: Template, seed: int, tumors: int = 1, small: bool = False,
                    moved: bool = False) -> BrainCase:
    """One synthetic multi-parametric case; ``seed`` fixes everything about it.

    Args:
        template: the MNI152 maps (:func:`pipelines.demo.synthetic.load_template`).
        seed: the case's random seed.
        tumors: separate tumors (1 or 2).
        small: a small enhancing lesion only (no necrosis, little edema, no mass effect).
        moved: the patient moves between series (a few mm and degrees before each after the first).
    """
    rng = np.random.default_rng(seed)
    maps, canon_affine = _canonical(template)
    shape = maps["wm"].shape
    label = np.zeros(shape, np.uint8)
    deep_wm = np.argwhere(ndimage.binary_erosion(maps["wm"] > 0.5, iterations=8))
    displacement = np.zeros((3, *shape), np.float32)
    centres: list[np.ndarray] = []
    for _ in range(tumors):
        for _attempt in range(50):
            centre = deep_wm[rng.integers(len(deep_wm))].astype(np.float32)
            if all(np.linalg.norm(centre - c) > 45 for c in centres):
                break
        centres.append(centre)
        radius = rng.uniform(3.0, 5.0) if small else rng.uniform(8.0, 14.0)
        box, necrosis, enhancing, edema, push = _tumor(rng, maps, centre, radius, small)
        region = label[box]
        region[edema & (region == 0)] = BRATS_LABELS["ED"]
        region[enhancing] = BRATS_LABELS["ET"]
        region[necrosis] = BRATS_LABELS["NCR"]
        displacement[(slice(None), *box)] += push
    # the anatomy pushed aside by the tumors (the lesions sit where they grew)
    if displacement.any():
        index = np.indices(shape, dtype=np.float32) - displacement
        maps = {name: ndimage.map_coordinates(m, index, order=1, mode="nearest") for name, m in maps.items()}
    texture = 1.0 + 0.08 * _smooth_field(rng, shape, control=12)
    contrast = {}
    for sequence, levels in TISSUE_LEVELS.items():
        volume = sum(maps[t] * levels[t] for t in ("wm", "gm", "csf"))
        for name, value in (("ncr", 1), ("ed", 2), ("et", 3)):
            volume = np.where(label == value, levels[name] * texture, volume)
        contrast[sequence] = volume.astype(np.float32)

    # the scanner: the head's pose, each series' grid over the brain, movement, bias field, noise
    centre_world = canon_affine[:3, :3] @ (np.asarray(shape) / 2.0) + canon_affine[:3, 3]
    pose = _rigid(rng, centre_world, 6.0, 5.0)
    brain_extent = np.abs(canon_affine[:3, :3] @ (np.asarray(shape) - 24)) + 2 * _FOV_MARGIN_MM
    gain = rng.uniform(1800, 2600)
    noise = rng.uniform(0.012, 0.03)

    def axes(spacing, orientation: str) -> tuple[tuple[int, ...], np.ndarray]:
        directions = ORIENTATIONS[orientation] * np.asarray(spacing, dtype=float)
        extent = np.abs(ORIENTATIONS[orientation].T) @ brain_extent  # the field of view along each axis
        grid_shape = tuple(int(v) for v in np.ceil(extent / np.asarray(spacing, dtype=float)))
        affine = np.eye(4)
        affine[:3, :3] = directions
        affine[:3, 3] = centre_world - directions @ (np.asarray(grid_shape) - 1) / 2.0
        return grid_shape, affine

    def render(contrast_name: str, spacing, movement: np.ndarray, orientation: str = "axial",
               draws: np.random.Generator = rng) -> Acquisition:
        grid_shape, affine = axes(spacing, orientation)
        world = _grid(grid_shape, affine).reshape(3, -1)
        anatomy = np.linalg.inv(movement @ pose)
        points = anatomy[:3, :3] @ world + anatomy[:3, 3:4]
        image = _sample(contrast[contrast_name], canon_affine, points, order=1).reshape(grid_shape)
        bias = np.exp(0.15 * _smooth_field(draws, grid_shape, control=3))
        real = image * bias + noise * draws.standard_normal(grid_shape)
        imaginary = noise * draws.standard_normal(grid_shape)
        stored = np.clip(np.sqrt(real**2 + imaginary**2) * gain, 0, 4095)
        return Acquisition(stored.astype(np.float32), affine, movement)

    acquisitions, notes = {}, []
    for number, (sequence, (contrast_name, spacing, orientation)) in enumerate(SEQUENCES.items()):
        movement = _rigid(rng, centre_world, 4.0, 4.0) if moved and acquisitions else np.eye(4)
        if orientation == "axial":
            acquisitions[sequence] = render(contrast_name, spacing, movement)
            continue
        # A series not on the axial 1 mm grid every series had at first takes its noise from a
        # stream of its own and skips the case's draws for that grid: the other series and the
        # BraTS-layout channels (those the shipped weights were trained on) stay as they were.
        acquisitions[sequence] = render(contrast_name, spacing, movement, orientation,
                                        np.random.default_rng([seed, number]))
        skipped, _ = axes((1.0, 1.0, 1.0), "axial")
        _smooth_field(rng, skipped, control=3)
        rng.standard_normal(skipped), rng.standard_normal(skipped)
        if moved and sequence != "t1n":
            notes.append(f"{sequence} moved {np.linalg.norm(movement[:3, 3]):.1f} mm")
    reference = acquisitions["t1n"]
    world = _grid(reference.image.shape, reference.affine).reshape(3, -1)
    anatomy = np.linalg.inv(pose)
    points = anatomy[:3, :3] @ world + anatomy[:3, 3:4]
    ref_label = _sample(label, canon_affine, points, order=0).reshape(reference.image.shape).astype(np.uint8)
    channels = {"t1n": reference.image}
    for sequence in CHANNELS[1:]:  # as BraTS distributes them: on the reference grid, no movement
        channels[sequence] = render(sequence, SEQUENCES["t1n"][1], np.eye(4), SEQUENCES["t1n"][2]).image
    return BrainCase(acquisitions, ref_label, channels, reference.affine, tumors, moved, notes)
