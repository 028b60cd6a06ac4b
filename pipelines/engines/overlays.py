"""PNG overlays of validation predictions, for a quick look at a run (and as MLflow artifacts)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events
from monai.utils import convert_to_numpy
from PIL import Image

from pipelines.io.writers import atomic_path
from pipelines.visualize import overlay_slice

__all__ = ["ValidationOverlays"]

class ValidationOverlays:
    """After each validation, write ``<output_dir>/epoch_<NNN>_<case>.png`` for the first cases.

    Each picture shows, side by side, the slice (along the last axis) with the most labelled voxels:
    the image with the reference labels, and the image with the prediction. Attach to a
    ``SupervisedEvaluator`` whose post-processed output holds class-index maps ``(1, *spatial)``.

    ``image_key``, ``label_key``, ``pred_key``: keys of the decollated engine output.

    Args:
        output_dir: folder for the PNGs (created).
        max_cases: cases drawn per validation (the first ones of the loader, so every epoch shows the same).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        max_cases: int = 2,
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
    ) -> None:
        if max_cases < 1:
            raise ValueError(f"max_cases must be >= 1, got {max_cases}")
        self.output_dir = Path(output_dir)
        self.max_cases = max_cases
        self.keys = (image_key, label_key, pred_key)
        self._written = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._written = 0

    def __call__(self, engine: Engine) -> None:
        outputs = engine.state.output
        for item in outputs if isinstance(outputs, list) else [outputs]:
            if self._written >= self.max_cases:
                return
            self._write(item, engine.state.epoch)
            self._written += 1

    def _write(self, item: dict, epoch: int) -> Path:
        image, label, pred = (convert_to_numpy(item[key]) for key in self.keys)
        image, label, pred = image[0], label[0], pred[0]
        if image.ndim == 3:
            weight = (label > 0).sum(axis=(0, 1)) + (pred > 0).sum(axis=(0, 1))
            index = int(np.argmax(weight)) if weight.any() else image.shape[2] // 2
            image, label, pred = image[..., index], label[..., index], pred[..., index]
        # (X, Y) in RAS: show with anterior up and the patient's right on the left (radiological)
        panels = [np.flipud(overlay_slice(image, lab).transpose(1, 0, 2)) for lab in (label, pred)]
        gap = np.full((panels[0].shape[0], 4, 3), 255, dtype=np.uint8)
        picture = np.concatenate([panels[0], gap, panels[1]], axis=1)
        name = Path(str(getattr(item[self.keys[0]], "meta", {}).get("filename_or_obj", f"case{self._written}"))).name
        name = name.split(".")[0] or f"case{self._written}"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"epoch_{epoch:03d}_{name}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(picture).save(tmp, format="PNG")
        return path
