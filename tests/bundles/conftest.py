"""Helpers to run bundle commands the way users do: ``python -m monai.bundle ...`` from the bundle folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, shared_data_dir

BUNDLES = REPO / "bundles"


def run_bundle(bundle: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle <args>`` in ``bundles/<bundle>``; fail with its output on error."""
    env = dict(os.environ, UNET_SHARED_DATA=str(shared_data_dir()), PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=BUNDLES / bundle,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        pytest.fail(f"monai.bundle {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def read_metrics(path: Path) -> dict[str, float]:
    """``metrics.csv`` written by MONAI's MetricsSaver: one ``name,value`` per line."""
    values = {}
    for line in path.read_text().splitlines():
        name, value = line.split(",")
        values[name] = float(value)
    return values


# ids that MONAI Label's bundle apps and users override or run (see the issues' bundle contracts)
TRAIN_IDS = (
    "bundle_root", "device", "dataset_dir", "network_def", "network", "training", "run", "train#trainer",
    "train#trainer#max_epochs", "train#dataset#data", "train#handlers", "validate#dataset#data",
    "validate#evaluator", "validate#handlers",
)
INFERENCE_IDS = ("bundle_root", "device", "dataset_dir", "network_def", "preprocessing", "inferer", "postprocessing", "run")


def assert_bundle_ids(train, inference) -> None:
    """Both parsers define the ids, and the train and inference networks are the same network."""
    for key in TRAIN_IDS:
        assert key in train, f"train: {key}"
    for key in INFERENCE_IDS:
        assert key in inference, f"inference: {key}"
    assert train.get("network_def") == inference.get("network_def")


def bundle_metadata(bundle: str) -> dict:
    import json

    return json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())


def bundle_parser(bundle: str, *files: str):
    """A ConfigParser over ``bundles/<bundle>/configs/<files>`` with its metadata and ``bundle_root``."""
    from monai.bundle import ConfigParser

    configs = BUNDLES / bundle / "configs"
    p = ConfigParser()
    p.read_config([str(configs / f) for f in files])
    p.read_meta(str(configs / "metadata.json"))
    p["bundle_root"] = str(BUNDLES / bundle)
    return p


BUNDLE_FILES = ("configs/metadata.json", "configs/train.json", "configs/inference.json", "configs/evaluate.json",
                "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md", "LICENSE", "models/model.pt")


def assert_bundle_layout(bundle: Path) -> None:
    """The files a bundle of this project ships, and weights small enough for the repository."""
    for name in BUNDLE_FILES:
        assert (bundle / name).is_file(), name
    assert (bundle / "models" / "model.pt").stat().st_size <= 20 * 2**20
