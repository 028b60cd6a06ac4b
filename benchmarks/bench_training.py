"""Benchmark the 3D tumor bundle's training loop against a plain MONAI spleen-bundle-style recipe.

Both run here, on the same demo cases and patch size, through MONAI's SupervisedTrainer built from
the bundle's own train.json; the peer overrides it the way MONAI's spleen_ct_segmentation bundle
is written: MONAI's residual ``UNet`` (channels 16-256, strides 2, two residual units, batch norm),
``LoadImaged`` + ``EnsureChannelFirstd``, a multi-process ``DataLoader`` (``--peer-workers``) over a
``CacheDataset``. Ours: ``pipelines.networks.UNet`` (same padding, instance norm), ``LoadVolumed``,
``ThreadDataLoader``.

Reported per recipe, after ``--warmup`` iterations: iterations per second, the FLOPs of one step
(forward and backward, ``torch.utils.flop_counter``: the two networks differ in cost, so speed per
FLOP is printed too), and the fraction of the iteration time spent waiting for the next batch (Ignite's GET_BATCH_STARTED -> GET_BATCH_COMPLETED;
goal: at most 10%). With CUDA (``--device cuda``) the training runs with AMP and the peak GPU memory
is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "unet3d_tumor"

PEER = {
    "network_def": {
        "_target_": "monai.networks.nets.UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": "@num_classes",
        "channels": [16, 32, 64, 128, 256],
        "strides": [2, 2, 2, 2],
        "num_res_units": 2,
        "norm": "batch",
    },
    "deterministic_transforms#0": {"_target_": "LoadImaged", "keys": ["image", "label"], "image_only": True},
    "deterministic_transforms#1": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"]},
            {"_target_": "Orientationd", "keys": ["image", "label"], "axcodes": "RAS"},
        ],
    },
    "train#dataloader": {
        "_target_": "DataLoader",
        "dataset": "@train#dataset",
        "batch_size": "@batch_size",
        "shuffle": True,
        "num_workers": "@peer_workers",
        "persistent_workers": "$@peer_workers > 0",
    },
}


class Timer:
    """Per-iteration wall time and time spent fetching the batch, from Ignite events."""

    def __init__(self, trainer, warmup: int) -> None:
        self.warmup, self.iteration, self.fetch = warmup, [], []
        self._marks: dict[str, float] = {}
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self._mark, "fetch")
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED, self._fetched)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._completed)

    def _mark(self, engine, name: str) -> None:
        self._marks[name] = time.perf_counter()

    def _fetched(self, engine) -> None:
        self._marks["fetched"] = time.perf_counter()

    def _completed(self, engine) -> None:
        now = time.perf_counter()
        if engine.state.iteration > self.warmup:
            self.iteration.append(now - self._marks["fetch"])
            self.fetch.append(self._marks["fetched"] - self._marks["fetch"])


def measure(name: str, overrides: dict, args, data_dir: Path, manifest: Path) -> dict:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["bundle_root"] = str(BUNDLE)
    parser["dataset_dir"], parser["manifest"] = str(data_dir), str(manifest)
    parser["device"] = f"$torch.device('{args.device}')"
    parser["patch_size"] = args.patch
    parser["peer_workers"] = args.peer_workers
    parser["cache_workers"] = 0
    parser["resume"] = False
    parser["max_epochs"] = 1
    parser["num_samples"] = args.num_samples
    parser["train#trainer#amp"] = args.device.startswith("cuda")
    parser["train#handlers"] = []  # no validation, checkpoints or logs: the loop itself
    parser["train#dataset#data"] = f"$@train_datalist[:{args.cases}]"
    parser["train#trainer#epoch_length"] = args.warmup + args.iterations
    for key, value in overrides.items():
        parser[key] = value
    trainer = parser.get_parsed_content("train#trainer")
    timer = Timer(trainer, args.warmup)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.run()
    total, fetch = sum(timer.iteration), sum(timer.fetch)
    network = parser.get_parsed_content("network")
    sample = torch.zeros(args.num_samples, 1, *args.patch, device=args.device)
    with FlopCounterMode(display=False) as counter:
        network(sample).sum().backward()  # forward and backward of one step's patches
    result = {
        "recipe": name,
        "it_per_s": len(timer.iteration) / total,
        "median_s": statistics.median(timer.iteration),
        "data_wait": fetch / total,
        "params_M": sum(p.numel() for p in network.parameters()) / 1e6,
        "gflop_step": counter.get_total_flops() / 1e9,
    }
    if args.device.startswith("cuda"):
        result["peak_gpu_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8, help="training cases cached (default 8)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-samples", type=int, default=2, help="patches per step (the bundle's num_samples)")
    parser.add_argument("--peer-workers", type=int, default=2, help="DataLoader workers of the MONAI recipe")
    parser.add_argument("--data", type=Path, default=None, help="demo data folder (default: a fresh one in a temp dir)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the speed")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.warmup, args.iterations, args.patch = 2, 1, 2, [32, 32, 32]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            from pipelines.demo import write_demo_data

            data, manifest = Path(tmp) / "demo", Path(tmp) / "manifest.json"
            write_demo_data(data, manifest, split={"training": args.cases}, dicom=False)
        else:
            data, manifest = args.data, args.data.parent / "data_manifests" / "demo_tumor.json"
            if not manifest.is_file():
                manifest = REPO / "data_manifests" / "demo_tumor.json"
        print(f"# {torch.get_num_threads()} torch threads, torch {torch.__version__}, device {args.device}, "
              f"patch {'x'.join(map(str, args.patch))}, {args.cases} cases, {args.iterations} timed iterations "
              f"(batch 1 x 2 patches)")
        rows = [measure("ours", {}, args, data, manifest), measure("monai-spleen", PEER, args, data, manifest)]
    header = f"{'recipe':<14}{'it/s':>8}{'median s':>10}{'data wait':>11}{'params M':>10}{'GFLOP/step':>12}"
    if args.device.startswith("cuda"):
        header += f"{'peak GPU MiB':>14}"
    print(header)
    for row in rows:
        line = (f"{row['recipe']:<14}{row['it_per_s']:>8.3f}{row['median_s']:>10.3f}{row['data_wait']:>10.1%}"
                f"{row['params_M']:>10.2f}{row['gflop_step']:>12.1f}")
        if "peak_gpu_MiB" in row:
            line += f"{row['peak_gpu_MiB']:>14.0f}"
        print(line)
    ours, peer = rows
    print(f"speed ratio ours/MONAI recipe: {ours['it_per_s'] / peer['it_per_s']:.2f}; "
          f"GFLOP/s ours {ours['gflop_step'] * ours['it_per_s']:.1f}, MONAI recipe {peer['gflop_step'] * peer['it_per_s']:.1f}; "
          f"data wait ours {ours['data_wait']:.1%} (goal <= 10%)")
    print(json.dumps({r["recipe"]: {k: round(v, 4) for k, v in r.items() if k != "recipe"} for r in rows}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
