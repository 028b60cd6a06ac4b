"""How closely the batch job measures the change since a prior study, over draws of the demo's
patient scanned twice (pipelines.demo.synthetic.make_follow_up).

For each generator seed: both studies written as DICOM (pipelines.demo.dataset.write_follow_up),
segmented in one batch run with the tumor bundle's shipped weights, and the record's comparison set
against the truth of the numbered lesion maps: the growing lesion's change, the new lesion's volume
and the tumor label's change, each as the measured value's relative error. The demo uses seed 1003.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _truth(folder: Path, entry: dict) -> tuple[list[float], float]:
    """Per-lesion volumes (mL) and the tumor label's volume of one study, from its true maps."""
    lesions = nib.load(folder / entry["lesions"])
    numbered = np.asarray(lesions.dataobj)
    voxel = abs(np.linalg.det(lesions.affine[:3, :3])) / 1000
    label = np.asarray(nib.load(folder / entry["label"]).dataobj)
    return [float((numbered == i).sum() * voxel) for i in (1, 2)], float((label == 1).sum() * voxel)


def measure(seed: int, work: Path) -> dict:
    from pipelines.batch import run_batch
    from pipelines.demo.dataset import write_follow_up
    from pipelines.demo.synthetic import load_template

    entries = write_follow_up(work, load_template(), seed)
    summary = run_batch(ROOT / "bundles" / "unet3d_tumor", work / "follow_up" / "dicom", work / "out", workers=0)
    if summary.done != 2:
        raise RuntimeError(f"seed {seed}: {summary}")
    comparison = next(c for c in (json.loads(p.read_text()).get("comparison")
                                  for p in (work / "out").glob("*/record.json")) if c)
    (before, tumor_before), (after, tumor_after) = (_truth(work, e) for e in entries)
    grown = next(lesion for lesion in comparison["lesions"] if lesion["status"] == "matched")
    new = [lesion for lesion in comparison["lesions"] if lesion["status"] == "new"]

    def error(measured: float, true: float) -> float:
        return 100.0 * (measured - true) / true

    return {
        "seed": seed,
        "growth": error(grown["change_ml"], after[0] - before[0]),
        "new": error(new[0]["now_ml"], after[1]) if len(new) == 1 else float("nan"),
        "tumor": error(comparison["volumes_ml"]["tumor"]["change_ml"], tumor_after - tumor_before),
        "new_found": len(new) == 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001, 1002, 1003])
    args = parser.parse_args()
    print("seed  growth error %  new lesion error %  tumor change error %  new lesion found")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as work:
            row = measure(seed, Path(work))
        print(f"{row['seed']:4d}  {row['growth']:+14.1f}  {row['new']:+18.1f}  {row['tumor']:+20.1f}  {row['new_found']}",
              flush=True)


if __name__ == "__main__":
    main()
