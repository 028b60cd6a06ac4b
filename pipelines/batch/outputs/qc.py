"""``qc.png`` and ``qc_thumbnail.png``: the picture a radiologist checks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipelines.batch.measures import VolumeMeasures
from pipelines.batch.outputs.base import CaseOutput, Output
from pipelines.batch.qc import save_qc_picture

__all__ = ["QcOutput"]


class QcOutput(Output):
    """``qc.png`` (axial, coronal and sagittal slices through the largest lesion, or the section; a
    row per input the bundle's ``qc_inputs`` names, e.g. FLAIR and T1c; the brain extracted from a
    whole head outlined) and ``qc_thumbnail.png`` for the run report. The caption and the slices
    come from the measures."""

    reads = ("measures",)

    def __init__(self, inputs: Sequence[str] = ()) -> None:
        self.inputs = list(inputs)  # the bundle's qc_inputs

    def write(self, out: CaseOutput) -> None:
        case, measures = out.segmented, out.measures
        if isinstance(measures, VolumeMeasures):
            parts = [f"{k} {v:.1f} mL" for k, v in measures.volumes_ml.items()]
            largest = measures.largest
        else:
            parts = [f"{k} {v:.1%}" for k, v in (measures.area_fractions if measures is not None else {}).items()]
            largest = None
        views = {key: case.views[key] for key in self.inputs
                 if key in case.views and np.shape(case.views[key]) == case.labels.shape}
        image = views or np.asarray(case.reference[0])
        save_qc_picture(out.case_dir / "qc.png", image, case.labels, case.affine,
                        point=largest.centre_voxel if largest else None,
                        outline=case.brain.mask if case.brain is not None else None,
                        caption=f"{out.case.case_id}  " + "  ".join(parts), thumbnail=out.case_dir / "qc_thumbnail.png")
        out.files += ["qc.png", "qc_thumbnail.png"]
