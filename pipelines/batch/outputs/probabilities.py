"""``prob.nii.gz``: the bundle's probabilities (``--probabilities``)."""

from __future__ import annotations

import numpy as np

from pipelines.batch.outputs.base import CaseOutput, Output
from pipelines.io.writers import save_nifti

__all__ = ["ProbabilityOutput"]


class ProbabilityOutput(Output):
    """``prob.nii.gz``: class or region probabilities on the reference grid."""

    def write(self, out: CaseOutput) -> None:
        if out.segmented.probabilities is not None:
            save_nifti(out.segmented.probabilities, out.segmented.affine, out.case_dir / "prob.nii.gz", dtype=np.float32)
            out.files.append("prob.nii.gz")
