"""Benchmark the batch job's overhead: total wall time against the sum of inference-only times.

The tumor bundle over 10 demo DICOM studies (the manifest's validation and test sections). First,
inference only: each study is loaded and preprocessed outside the clock, then the network's
sliding-window pass (with softmax and argmax) is timed. Then the whole batch job, fresh output,
timed from the call to its return: model loading, study discovery, loading, preprocessing,
inference, mapping back to the source grid, mask/SEG/QC/record writing and the reports. The goal
is a ratio of at most 1.15 (loading and writing hidden behind inference). Repeated --repeats times;
medians are printed.
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


def _manifest(data: Path, count: int, folder: Path) -> Path:
    raw = json.loads((ROOT / "data_manifests" / "demo_tumor.json").read_text())
    entries = (raw["validation"] + raw["test"])[:count]
    path = folder / "manifest.json"
    path.write_text(json.dumps({"test": entries}))
    return path


def _inference_only(bundle: Path, manifest: Path, data: Path) -> float:
    import torch

    from pipelines.batch import BundleModel, discover_cases

    model = BundleModel(bundle)
    cases = discover_cases(manifest, model.series_rules, dataset_dir=data)
    inputs = [model.preprocess(c.load(model.series_rules, model.load_options, Path(tempfile.gettempdir())))
              [model.network_input_key] for c in cases]
    total = 0.0
    with torch.inference_mode():
        model.inferer(inputs[0].as_tensor()[None], model.network)  # warm-up, not counted
        for image in inputs:
            start = time.perf_counter()
            logits = model.inferer(image.as_tensor()[None], model.network)
            torch.softmax(logits, 1).argmax(1)
            total += time.perf_counter() - start
    return total


def _batch(bundle: Path, manifest: Path, data: Path, out: Path, workers: int) -> float:
    from pipelines.batch import run_batch

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = run_batch(bundle, manifest, out, dataset_dir=data, workers=workers)
    seconds = time.perf_counter() - start
    if summary.done != summary.cases:
        raise RuntimeError(f"batch run failed cases: {summary.failed}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "demo_data", help="the demo data set (make demo-data)")
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "unet3d_tumor")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        manifest = _manifest(args.data, args.cases, Path(tmp))
        _batch(args.bundle, manifest, args.data, Path(tmp) / "warm", args.workers)  # page cache, imports
        inference, wall = [], []
        for _ in range(args.repeats):
            inference.append(_inference_only(args.bundle, manifest, args.data))
            wall.append(_batch(args.bundle, manifest, args.data, Path(tmp) / "out", args.workers))
    inf, total = statistics.median(inference), statistics.median(wall)
    print(f"== batch job: {args.cases} demo DICOM studies, tumor bundle, {torch.get_num_threads()} threads, "
          f"--workers {args.workers}, median of {args.repeats} ==")
    print(f"inference only (sum over cases) {inf:7.2f} s")
    print(f"batch job wall time             {total:7.2f} s  (mask, DICOM SEG and SR, QC, record, reports)")
    print(f"ratio wall / inference          {total / inf:7.3f}  (goal <= 1.15)")


if __name__ == "__main__":
    main()
