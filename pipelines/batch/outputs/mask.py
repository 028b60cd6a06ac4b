"""``mask.nii.gz``: the label map on the reference input's grid; ``mask.png`` for a picture."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipelines.batch.outputs.base import CaseOutput, Grid, Output
from pipelines.io.writers import atomic_path, save_nifti

__all__ = ["MaskOutput"]


class MaskOutput(Output):
    """``mask.nii.gz`` (``mask.png`` for a picture) and the record's ``grid``."""

    provides = ("grid",)

    def write(self, out: CaseOutput) -> None:
        case = out.segmented
        dtype = np.uint8 if case.labels.max(initial=0) <= 255 else np.uint16
        if case.is_picture:
            with atomic_path(out.case_dir / "mask.png") as tmp:
                Image.fromarray(np.ascontiguousarray(case.labels.T.astype(dtype))).save(tmp, format="PNG")
            out.files.append("mask.png")
        else:
            save_nifti(case.labels, case.affine, out.case_dir / "mask.nii.gz", dtype=dtype)
            out.files.append("mask.nii.gz")
        out.grid = Grid(list(case.labels.shape), [round(float(s), 4) for s in case.spacing])

    def fields(self, out: CaseOutput) -> dict:
        return {"grid": out.grid.as_record()} if out.grid is not None else {}
