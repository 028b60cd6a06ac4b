"""The brain tumor bundle's few-case recipe on a CPU: 4 training cases, FLAIR and T1c, in the form
real public glioma data come in (skull-stripped, z-scored within the brain by an earlier pipeline,
the background one constant at the minimum), trained within the budget that matters to a user (about
25 minutes on 2 cores), then evaluated on held-out cases.

Contenders, one after the other in this run: the fine-tuning recipe (``configs/finetune.json``: from
the shipped weights' FLAIR and T1c inputs) and the same number of epochs from scratch
(``configs/train.json``). The cases are the demo's (``make demo-brain``), turned into that form here;
``--real`` adds the shared BraTS 2013 pair (train on one, validate on the other: a smoke test, two
cases cannot measure accuracy).

    python benchmarks/brain_few_cases.py --data demo_brain [--epochs 80] [--real ../shared/data/brats2013_dev]

Prints each contender's wall time and validation Dice per region (2 mm grid, the bundle's evaluate).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "unet3d_brain_tumor"
CHANNELS = ("t2f", "t1c")


def normalised_elsewhere(data: Path, entry: dict, out: Path) -> dict:
    """A demo case as another pipeline leaves it: FLAIR and T1c z-scored within the brain, the rest
    one constant at the minimum (as the BraTS 2013 files are); the label as it is."""
    from pipelines.transforms import ChannelsNormalize

    paths = dict(zip(entry["channels"], entry["image"]))
    images = [nib.load(data / paths[c]) for c in CHANNELS]
    stack = np.stack([np.asarray(i.dataobj, np.float32) for i in images])
    brain = ChannelsNormalize().foreground(torch.from_numpy(stack)).numpy()
    case = out / entry["case_id"]
    case.mkdir(parents=True, exist_ok=True)
    written = []
    for channel, volume, image in zip(CHANNELS, stack, images):
        z = (volume - volume[brain].mean()) / volume[brain].std()
        z = np.where(brain, z, z[brain].min()).astype(np.float32)
        nib.save(nib.Nifti1Image(z, image.affine), case / f"{channel}.nii.gz")
        written.append(f"{entry['case_id']}/{channel}.nii.gz")
    label = nib.load(data / entry["label"])
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj, np.uint8), label.affine), case / "seg.nii.gz")
    return {"case_id": entry["case_id"], "channels": list(CHANNELS), "image": written,
            "label": f"{entry['case_id']}/seg.nii.gz"}


def _bundle(*words: str) -> float:
    """``python -m monai.bundle`` in the bundle folder; its wall time in seconds."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *words], cwd=BUNDLE, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-4000:])
    return time.perf_counter() - start


def contender(name: str, configs: list[str], dataset: Path, manifest: Path, work: Path, overrides: list[str]) -> dict:
    models, common = work / name / "models", ["--meta_file", "configs/metadata.json", "--logging_file",
                                              "configs/logging.conf", "--dataset_dir", str(dataset),
                                              "--manifest", str(manifest), *overrides]
    seconds = _bundle("run", "training", "--config_file", str(configs), "--ckpt_dir", str(models),
                      "--output_dir", str(work / name / "train"), *common)
    _bundle("run", "--config_file", "['configs/train.json','configs/evaluate.json']", "--best_model_path",
            str(models / "model.pt"), "--output_dir", str(work / name / "eval"), *common)
    with open(work / name / "eval" / "metrics.csv") as f:
        metrics = {row[0]: float(row[1]) for row in csv.reader(f) if len(row) > 1}
    return {"contender": name, "train_minutes": round(seconds / 60, 1),
            **{region: round(metrics[f"val_dice_{region}"], 4) for region in ("WT", "TC", "ET")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=lambda p: Path(p).resolve(), default=ROOT / "demo_brain")
    parser.add_argument("--manifest", type=Path, default=ROOT / "data_manifests" / "demo_brain.json")
    parser.add_argument("--cases", type=int, default=4, help="training cases")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the recipe's)")
    parser.add_argument("--real", type=Path,
                        help="the shared brats2013_dev folder: also train on one, validate on the other")
    args = parser.parse_args()
    entries = json.loads(args.manifest.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = {"demo, z-scored elsewhere": (
            work / "demo", {section: [normalised_elsewhere(args.data, e, work / "demo") for e in chosen]
                            for section, chosen in (("training", entries["training"][:args.cases]),
                                                    ("validation", entries["validation"]))},
            ["--channels", str(list(CHANNELS))])}
        if args.real:
            def real(case: str) -> dict:
                return {"case_id": case, "channels": list(CHANNELS), "label": f"{case}/OTMultiClass.nii.gz",
                        "image": [f"{case}/Flair_subtrMeanDivStd.nii.gz", f"{case}/T1c_subtrMeanDivStd.nii.gz"]}
            sets["BraTS 2013 pair"] = (args.real.resolve(), {"training": [real("brats_2013_pat0005_1")],
                                                   "validation": [real("brats_2013_pat0006_1")]},
                                       ["--channels", str(list(CHANNELS)), "--label_map", "{'3': 1, '4': 3}"])
        for label, (dataset, sections, overrides) in sets.items():
            manifest = work / f"{len(label)}.json"
            manifest.write_text(json.dumps({**sections, "test": []}))
            recipe = json.loads((BUNDLE / "configs" / "finetune.json").read_text())
            count = args.epochs or recipe["max_epochs"]  # both contenders train as long
            same = ["--max_epochs", str(count), "--val_interval", str(min(count, recipe["val_interval"]))]
            for name, configs in (("fine-tuned", ["configs/train.json", "configs/finetune.json"]),
                                  ("from scratch", ["configs/train.json"])):
                row = contender(name.replace(" ", "_"), configs, dataset, manifest, work / str(len(label)),
                                [*overrides, *same])
                print(json.dumps({"set": label, "training_cases": len(sections["training"]), **row}), flush=True)


if __name__ == "__main__":
    main()
