"""``index.html``: the case page a radiologist checks the segmentation on (:mod:`pipelines.batch.case_page`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipelines.batch.case_page import PageContent, render_case_page
from pipelines.batch.comparison import PriorComparison
from pipelines.batch.measures import VolumeMeasures
from pipelines.batch.outputs.base import CaseOutput, Output
from pipelines.batch.viewer import install_viewer, page_images, with_labels
from pipelines.io.writers import atomic_path
from pipelines.visualize import label_colour

__all__ = ["PAGE_FILE", "CasePageOutput", "diameter_map"]

PAGE_FILE = "index.html"


def diameter_map(lesions, shape: tuple[int, ...], steps: Sequence[int]) -> tuple[np.ndarray, dict[int, list[float]]]:
    """The RANO diameters (:class:`pipelines.metrics.rano.LesionDiameters`) drawn on a grid of
    ``shape`` that keeps every ``steps[i]``-th voxel along axis ``i`` of theirs: 1 along the longest,
    2 along the perpendicular, on the slice each was measured on. Returns the map and, per lesion, the
    voxel of their grid at the middle of its longest diameter."""
    drawn = np.zeros(shape, np.uint8)
    steps = np.asarray(steps, float)
    middles = {}
    for lesion in lesions:
        for value, diameter in ((1, 0), (2, 1)):
            start, end = lesion.voxels(diameter) / steps
            count = int(np.ceil(np.abs(end - start).max() * 2)) + 2
            index = np.rint(start + np.linspace(0, 1, count)[:, None] * (end - start)).astype(int)
            index[:, lesion.axis] = int(lesion.slice_index // steps[lesion.axis])  # the kept slice at or before it
            index = tuple(np.clip(index, 0, np.asarray(shape) - 1).T)
            drawn[index] = np.maximum(drawn[index], value)
        middles[lesion.lesion] = lesion.voxels(0).mean(axis=0).tolist()
    return drawn, middles


class CasePageOutput(Output):
    """``index.html`` for a volume: the study's inputs as the bundle's preprocessing aligned them, those
    the QC picture shows first (``inputs``: the bundle's ``qc_inputs``, then its other inputs; none:
    the reference image as loaded), with the label map, the measurements, the RANO diameters drawn, and the prior
    study's anatomy and mask registered onto this grid. The run's copy of NiiVue is made with the
    first page.

    Args:
        output: the run's output folder.
        script: NiiVue's browser build (:func:`pipelines.batch.viewer.viewer_script`).
        labels: the bundle's label names by value.
        bundle: the bundle's name, for the page.
        inputs: the input keys to show, in order (see above).
    """

    reads = ("measures", "comparison", "rano")

    def __init__(self, output: Path, script: Path, labels: Mapping[int, str], bundle: str,
                 inputs: Sequence[str] = ()) -> None:
        self.output, self.script = Path(output), Path(script)
        self.inputs = list(inputs)
        self.labels = {int(value): (name, label_colour(value).tolist())
                       for value, name in labels.items() if int(value) > 0}
        self.bundle = bundle
        self._installed = False

    def write(self, out: CaseOutput) -> None:
        # pipelines.metrics imports MONAI (its BraTS metrics), and with it Ignite: see pipelines.batch.bundle
        from pipelines.metrics.rano import axial_axis

        case = out.segmented
        if case.labels.ndim != 3 or case.is_picture or not isinstance(out.measures, VolumeMeasures):
            return
        if not self._installed:
            install_viewer(self.output, self.script)
            self._installed = True
        volumes = {key: case.views[key] for key in self.inputs
                   if key in case.views and np.shape(case.views[key]) == case.labels.shape} \
            or {case.reference_key: np.asarray(case.reference[0])}
        maps = {"labels": case.labels}
        if isinstance(out.comparison, PriorComparison) and out.comparison.images is not None:
            volumes["prior"], maps["prior_labels"] = out.comparison.images.on_grid(case.labels.shape, case.affine)
        images = page_images(volumes, maps, case.affine, through=axial_axis(case.affine))
        goto = None
        if out.rano is not None and out.rano.lesions:
            drawn, goto = diameter_map(out.rano.lesions, images.shape(case.labels.shape), images.steps)
            images = with_labels(images, "diameters", drawn, case.affine)
        start = out.measures.largest.centre_voxel if out.measures.largest else [n // 2 for n in case.labels.shape]
        content = PageContent(out.case.case_id, self.bundle, images, {k: k for k in volumes if k != "prior"},
                              self.labels, case.affine, start, out.measures, out.comparison, out.rano, goto)
        with atomic_path(out.case_dir / PAGE_FILE) as tmp:
            tmp.write_text(render_case_page(content), encoding="utf-8")
        out.files.append(PAGE_FILE)
