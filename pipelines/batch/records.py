"""Each segmented or failed case's outputs and ``record.json``, written last (the list of outputs:
:mod:`pipelines.batch.outputs`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pipelines.batch.brain import BrainExtraction
from pipelines.batch.cases import Case
from pipelines.batch.notices import case_warnings
from pipelines.batch.outputs import OUTPUT_FILES, CaseOutput, Output
from pipelines.io import geometry_corrections
from pipelines.io.writers import atomic_path

__all__ = ["Records"]

logger = logging.getLogger(__name__)


class Records:
    """Writes each case's outputs (the list of :class:`Output`) and its ``record.json``, last.

    Args:
        output: the run's output folder.
        outputs: what to write for a segmented case.
        base: what every record holds (model, settings, run key, software).
        reference_key: the bundle's reference input.
    """

    def __init__(self, output: Path, outputs: Sequence[Output], base: Mapping, reference_key: str) -> None:
        self.output, self.outputs, self.base, self.reference_key = output, list(outputs), dict(base), reference_key

    def _start(self, case: Case) -> Path:
        case_dir = self.output / case.case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        for name in ("record.json", *OUTPUT_FILES):
            (case_dir / name).unlink(missing_ok=True)
        return case_dir

    def _record(self, case: Case) -> dict:
        return {"case_id": case.case_id, "source": case.source(), "input_hash": case.input_hash, **self.base}

    def _retries(self, case: Case) -> dict:
        """``{"retries": {step: count}}``, the retries a server's transient failures took
        (:mod:`pipelines.batch.retry`) for each step of the case that talks to one: ``fetch`` from a
        server input, ``push`` with a push destination; {} for neither."""
        steps = ["fetch"] if case.kind in ("dicomweb", "dimse") else []
        if self.base.get("settings", {}).get("push"):
            steps.append("push")
        return {"retries": {step: case.retries.get(step, 0) for step in steps}} if steps else {}

    def failed(self, case: Case, error: str, timings: Mapping | None = None, warnings: Sequence[str] = ()) -> dict:
        case_dir = self._start(case)
        record = {**self._record(case), "status": "failed", "error": error, "outputs": [],
                  "timings": dict(timings or {}), **self._retries(case), "warnings": case_warnings(case, warnings),
                  "finished": _now()}
        _write_record(case_dir, record)
        # the reason can hold file or folder names, which may name the patient: it goes to the record only
        logger.warning("%s: failed; the reason is in %s/record.json", case.case_id, case.case_id)
        return record

    def ok(self, case: Case, sources: Mapping, labels, probabilities, timings: dict, warnings: Sequence[str],
           views: Mapping | None = None, brain: BrainExtraction | None = None) -> dict:
        """Writes the outputs of a segmented case (``labels`` ``(1, *spatial)`` on the reference input's
        grid) and its record. ``warnings``: the case's so far, a list that warnings raised while the
        outputs are written join (:class:`~pipelines.batch.notices.CaseWarnings`). Raises what an
        output raises (the caller records the failure)."""
        start = time.perf_counter()
        reference = sources[self.reference_key]
        label_map = np.asarray(labels)[0]
        if label_map.shape != tuple(reference.shape[1:]):
            raise RuntimeError(f"the prediction's grid {label_map.shape} differs from input "
                               f"{self.reference_key!r}'s {tuple(reference.shape[1:])}: the bundle's postprocessing "
                               f"must return the label map on the reference input's grid")
        out = CaseOutput(case, self._start(case), sources, self.reference_key, label_map,
                         None if probabilities is None else np.asarray(probabilities, dtype=np.float32),
                         views=dict(views or {}), brain=brain, record=self._record(case))
        for output in self.outputs:
            output.write(out)
        timings = dict(timings, write_s=time.perf_counter() - start)
        timings["total_s"] = sum(v for k, v in timings.items() if k != "total_s")
        out.record.update({
            "status": "ok",
            "error": None,
            "outputs": out.files,
            "geometry_corrections": geometry_corrections(reference.meta),
            **_registration(sources),
            "timings": {k: round(v, 3) for k, v in timings.items()},
            **self._retries(case),  # read now: the push may have retried
            "warnings": case_warnings(case, warnings),  # read now: the outputs may have added some
            "finished": _now(),
        })
        _write_record(out.case_dir, out.record)
        for output in self.outputs:
            output.finished(out.case_dir, out.record)
        if "volumes_ml" in out.record:
            volumes = ", ".join(f"{k} {v} mL" for k, v in out.record["volumes_ml"].items())
            logger.info("%s: ok (%s)", case.case_id, volumes)
        else:
            logger.info("%s: ok", case.case_id)
        return out.record


def _registration(sources: Mapping) -> dict:
    """``{"registration": {input: how it was aligned with the reference}}`` when the bundle's
    preprocessing registered inputs (:class:`pipelines.transforms.RegisterToReferenced`), else {}."""
    found = {key: source.meta["registration"] for key, source in sources.items()
             if "registration" in getattr(source, "meta", {})}
    return {"registration": found} if found else {}


def _write_record(case_dir: Path, record: dict) -> None:
    with atomic_path(case_dir / "record.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
