"""Choosing post-processing parameters on labelled cases (never on the cases reported)."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from itertools import product

import numpy as np
import torch

__all__ = ["tune_membrane_watershed"]

logger = logging.getLogger(__name__)


def tune_membrane_watershed(
    cases: Sequence[Mapping],
    preprocessing: Callable,
    network: torch.nn.Module,
    inferer: Callable,
    grid: Mapping[str, Sequence],
    output_csv: str | os.PathLike | None = None,
    membrane_channel: int = 0,
    max_pixel_error: float | None = None,
) -> list[dict]:
    """Score every combination of :func:`pipelines.transforms.membrane_watershed` parameters.

    Each case is preprocessed (``image``, ``label`` with 1 = cell), segmented once by
    ``inferer(image, network)`` (softmax taken), then post-processed with each combination of
    ``grid`` (e.g. ``{"threshold": [0.5, 0.8], "seed_threshold": [0.2], ...}``).

    Returns:
        One row per combination with its mean ``pixel_error`` and ``rand_error``, best first: the
        smallest sum of the two, or with ``max_pixel_error`` the smallest Rand error among the rows
        within that pixel error (then the rest); also written to ``output_csv`` when given.
    """
    from pipelines.metrics import pixel_error, rand_error
    from pipelines.transforms import membrane_watershed

    names = sorted(grid)
    combinations = [dict(zip(names, values)) for values in product(*(grid[n] for n in names))]
    probabilities, labels = [], []
    device = next(network.parameters()).device
    network.eval()
    with torch.inference_mode():
        for case in cases:
            data = preprocessing(dict(case))
            logits = inferer(torch.as_tensor(data["image"])[None].to(device), network)
            probabilities.append(torch.softmax(logits.float(), dim=1)[0, membrane_channel].cpu().numpy())
            labels.append(np.asarray(data["label"])[0])
    rows = []
    for params in combinations:
        predictions = [membrane_watershed(p, **params) for p in probabilities]
        rows.append({
            **params,
            "pixel_error": float(np.mean([pixel_error(q, t) for q, t in zip(predictions, labels)])),
            "rand_error": float(np.mean([rand_error(q, t) for q, t in zip(predictions, labels)])),
        })
    if max_pixel_error is None:
        rows.sort(key=lambda r: r["pixel_error"] + r["rand_error"])
    else:
        rows.sort(key=lambda r: (r["pixel_error"] > max_pixel_error, r["rand_error"], r["pixel_error"]))
    if output_csv is not None:
        from pipelines.io.writers import atomic_path

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=[*names, "pixel_error", "rand_error"])
        writer.writeheader()
        writer.writerows(rows)
        with atomic_path(output_csv) as tmp:
            tmp.write_text(text.getvalue())
    logger.info("best of %d combinations on %d cases: %s", len(rows), len(cases), rows[0])
    return rows
