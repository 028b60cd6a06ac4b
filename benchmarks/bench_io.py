"""Benchmark pipelines.io.load_volume against SimpleITK's ImageSeriesReader on one CT series.

A 512x512x300 int16 CT series (RescaleSlope 1, RescaleIntercept -1024; written once to
bench_output/ct_series) is loaded by each reader in a fresh process, alternating, --repeats times.
Reported: median wall time of the load call (each reader's modules imported before the clock
starts, as in a long-running job), the ratio ours / SimpleITK (the goal is at most 1.2), and the
peak resident memory the load added over the process after imports, relative to the size of the
volume that reader returns (the goal is at most 1.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np
reader, folder = sys.argv[1], sys.argv[2]
if reader == "ours":
    from pipelines.io import load_volume
    import pipelines.io.dicom, pipelines.io.dicom.volume  # imported lazily by load_volume: not timed
    load = lambda: load_volume(folder)
else:
    import SimpleITK as sitk
    def load():
        r = sitk.ImageSeriesReader()
        r.SetFileNames(r.GetGDCMSeriesFileNames(folder))
        return sitk.GetArrayViewFromImage(r.Execute())
import pydicom  # both readers' imports done before the baseline
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
volume = load()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
array = np.asarray(volume)
print(json.dumps({"seconds": seconds, "added_mib": (peak - baseline) / 1024, "shape": list(array.shape),
                  "dtype": str(array.dtype), "volume_mib": array.nbytes / 2**20}))
"""


def write_series(folder: Path, rows: int, columns: int, slices: int) -> None:
    import numpy as np
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2000, size=(rows, columns), dtype=np.int16)
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName, ds.InstanceNumber = "CT", "BENCH", "Bench^Mark", k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-250.0, -250.0, -400.0 + 1.25 * k]
        ds.PixelSpacing, ds.SliceThickness = [0.9765625, 0.9765625], 1.25
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.roll(base, k, axis=0).tobytes()
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)


def run(reader: str, folder: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, reader, str(folder)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 300], metavar=("ROWS", "COLUMNS", "SLICES"))
    parser.add_argument("--data", type=Path, default=Path("bench_output"))
    args = parser.parse_args(argv)
    rows, columns, slices = args.size
    folder = args.data / f"ct_series_{rows}x{columns}x{slices}"
    if not (folder / f"{slices - 1:04d}.dcm").is_file():
        write_series(folder, rows, columns, slices)
    results: dict[str, list[dict]] = {"ours": [], "simpleitk": []}
    for _ in range(args.repeats):
        for reader in results:
            results[reader].append(run(reader, folder))
    ours_s = statistics.median(r["seconds"] for r in results["ours"])
    sitk_s = statistics.median(r["seconds"] for r in results["simpleitk"])
    print(f"# DICOM series {rows}x{columns}x{slices} int16 (HU = stored - 1024), {args.repeats} runs each")
    print(f"{'reader':12s} {'median s':>9s} {'volume':>16s} {'peak added MiB':>15s} {'x volume':>9s}")
    for reader, seconds in (("ours", ours_s), ("simpleitk", sitk_s)):
        added = statistics.median(r["added_mib"] for r in results[reader])
        volume = results[reader][0]
        size = f"{volume['dtype']} {volume['volume_mib']:.0f} MiB"
        print(f"{reader:12s} {seconds:9.3f} {size:>16s} {added:15.0f} {added / volume['volume_mib']:9.2f}")
    print(f"time ratio ours/SimpleITK: {ours_s / sitk_s:.2f} (goal <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
