"""``brain_mask.nii.gz`` and the record's ``brain_extraction``."""

from __future__ import annotations

import numpy as np

from pipelines.batch.outputs.base import CaseOutput, Output
from pipelines.io.writers import save_nifti

__all__ = ["BrainMaskOutput"]


class BrainMaskOutput(Output):
    """``brain_mask.nii.gz`` (the brain on the reference grid) for a whole-head study whose bundle
    extracted the brain, and the record's ``brain_extraction`` whenever the bundle ran its step."""

    def write(self, out: CaseOutput) -> None:
        brain = out.segmented.brain
        if brain is not None and brain.mask is not None:
            save_nifti(brain.mask.astype(np.uint8), out.segmented.affine, out.case_dir / "brain_mask.nii.gz",
                       dtype=np.uint8)
            out.files.append("brain_mask.nii.gz")

    def fields(self, out: CaseOutput) -> dict:
        brain = out.segmented.brain
        return {"brain_extraction": dict(brain.report)} if brain is not None else {}
