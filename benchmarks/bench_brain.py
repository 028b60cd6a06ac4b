"""Benchmark the brain tumor bundle through the batch job: seconds per whole four-series study.

The demo's validation and test studies (make demo-brain), each a DICOM MR study of six series as a
scanner exports it: the job finds the four sequences by the bundle's series rules, loads them,
resamples and rigidly registers three of them onto the T1, runs the network, maps the regions back
to the T1's grid and writes the mask, DICOM SEG, QC picture, record and reports. Studies lacking a
sequence are left out (they fail at once). The network runs on the bundle's runtime or on
``--runtime``. The goal is at most 60 s per study on 2 CPU cores, all stages included; no peer runs
offline (nnU-Net and MONAI's BraTS bundle need the sequences picked, converted and co-registered by
hand first), so the ratio printed is against the goal. The stage times are the records' medians.
Repeated --repeats times; medians are printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 60.0
STAGES = ("load_s", "preprocess_s", "inference_s", "write_s")


def _studies(data: Path, count: int, folder: Path) -> Path:
    """The first ``count`` complete studies of the validation and test sections, copied under ``folder``."""
    raw = json.loads((ROOT / "data_manifests" / "demo_brain.json").read_text())
    entries = [e for e in raw["validation"] + raw["test"] if not e.get("dicom_missing")][:count]
    inbox = folder / "in"
    for entry in entries:
        shutil.copytree(data / entry["study"], inbox / entry["case_id"])
    return inbox


def _batch(bundle: Path, inbox: Path, out: Path, workers: int, runtime: str | None) -> tuple[float, list[dict]]:
    from pipelines.batch import run_batch

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = run_batch(bundle, inbox, out, workers=workers, runtime=runtime)
    seconds = time.perf_counter() - start
    if summary.done != summary.cases:
        raise RuntimeError(f"batch run failed cases: {summary.failed}")
    records = [json.loads(p.read_text()) for p in out.glob("*/record.json")]
    return seconds, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "demo_brain", help="the brain demo (make demo-brain)")
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "unet3d_brain_tumor")
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--runtime", default=None, choices=["torch", "openvino", "openvino-int8"],
                        help="where the network runs (default: the bundle's `runtime`)")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="bench_brain_") as tmp:
        inbox = _studies(args.data, args.studies, Path(tmp))
        count = len(list(inbox.iterdir()))
        walls, stages = [], {stage: [] for stage in STAGES}
        for _ in range(args.repeats):
            seconds, records = _batch(args.bundle, inbox, Path(tmp) / "out", args.workers, args.runtime)
            walls.append(seconds / count)
            for record in records:
                for stage in STAGES:
                    stages[stage].append(record["timings"][stage])
    per_study = statistics.median(walls)
    print(f"== brain tumor bundle, batch job: {count} demo MR studies of six series, {torch.get_num_threads()} "
          f"threads, --workers {args.workers}, runtime {args.runtime or 'default'}, median of {args.repeats} ==")
    for stage in STAGES:
        print(f"{stage[:-2]:<28} {statistics.median(stages[stage]):7.2f} s per study (median)")
    print(f"wall time per study          {per_study:7.2f} s  (run wall time / studies, all stages and reports)")
    print(f"ratio per study / goal       {per_study / GOAL_S:7.3f}  (goal <= 1: {GOAL_S:.0f} s per study)")


if __name__ == "__main__":
    main()
