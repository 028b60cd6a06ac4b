"""Each segmented or failed case's outputs and ``record.json``, written last from what the outputs
made (the list of outputs: :mod:`pipelines.batch.outputs`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from pipelines.batch.cases import Case
from pipelines.batch.notices import case_warnings
from pipelines.batch.outputs import OUTPUT_FILES, CaseOutput, Output, Segmented, check_order
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
        check_order(outputs)
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
        (:mod:`pipelines.batch.remote.retry`) for each step of the case that talks to one: ``fetch`` from a
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

    def ok(self, segmented: Segmented) -> dict:
        """Writes the outputs of a segmented case, then its record from what they made.
        ``segmented.warnings`` is the case's list so far, which warnings raised while the outputs are
        written join (:class:`~pipelines.batch.notices.CaseWarnings`). Raises what an output raises
        (the caller records the failure)."""
        start = time.perf_counter()
        case = segmented.case
        out = CaseOutput(segmented, self._start(case), str(self.base.get("run_key")))
        for output in self.outputs:
            output.write(out)
        timings = dict(segmented.timings, write_s=time.perf_counter() - start)
        timings["total_s"] = sum(v for k, v in timings.items() if k != "total_s")
        record = self._record(case)
        for output in self.outputs:
            record.update(output.fields(out))
        record.update({
            "status": "ok",
            "error": None,
            "outputs": out.files,
            "geometry_corrections": geometry_corrections(segmented.reference.meta),
            **({"registration": dict(segmented.registration)} if segmented.registration else {}),
            "timings": {k: round(v, 3) for k, v in timings.items()},
            **self._retries(case),  # read now: the push may have retried
            "warnings": case_warnings(case, segmented.warnings),  # read now: the outputs may have added some
            "finished": _now(),
        })
        _write_record(out.case_dir, record)
        for output in self.outputs:
            output.finished(out.case_dir, record)
        if "volumes_ml" in record:
            volumes = ", ".join(f"{k} {v} mL" for k, v in record["volumes_ml"].items())
            logger.info("%s: ok (%s)", case.case_id, volumes)
        else:
            logger.info("%s: ok", case.case_id)
        return record


def _write_record(case_dir: Path, record: dict) -> None:
    with atomic_path(case_dir / "record.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
