"""Benchmark the network's runtimes on the CPU: torch (the project's CPU path), OpenVINO float32 and
the bundle's int8 model (``unet-pipelines quantize``), idle and beside a competing CPU-bound process.

For each bundle (brain tumor, tumor): per window, the network on one window of the inferer's size, the
call alone; per volume, a demo study as the bundle's preprocessing leaves it through the bundle's own
sliding-window inferer (windows, Gaussian blending, the bundle's postprocessing), with the Dice of each
label and region against torch's. The contenders alternate within each round, so that a change in
the machine's load meets all; medians over the rounds, and each runtime's speed-up over torch. Then
the same again with one CPU-bound process beside (``--load``: a Python busy loop), and each runtime's
time under load over its idle time. OpenVINO's conversion is done before the timing (the batch job
keeps it on disk). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = {  # bundle -> (manifest, demo folder, manifest key of the study)
    "unet3d_brain_tumor": ("demo_brain.json", "demo_brain", "study"),
    "unet3d_tumor": ("demo_tumor.json", "demo_data", "dicom"),
}


def _timed(call, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def _study(model, manifest: Path, data: Path, key: str):
    """The first complete demo study of the test section, loaded and preprocessed as the batch job does."""
    from pipelines.batch.studies import from_manifest

    entry = next(e for e in json.loads(manifest.read_text())["test"] if not e.get("dicom_missing"))
    case = next(c for c in from_manifest(manifest, "test", data, key, model.series_rules, None)
                if c.case_id == entry["case_id"])
    with tempfile.TemporaryDirectory() as cache:
        inputs = case.load(model.series_rules, model.load_options, Path(cache))
    return model.preprocess(inputs)


@contextmanager
def _competing(load: bool):
    """One CPU-bound process beside the benchmark while inside (none when ``load`` is false)."""
    if not load:
        yield
        return
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        busy.kill()
        busy.wait()


def _dice(model, reference, found) -> dict[str, float]:
    import numpy as np

    groups = {name: [v] for v, name in model.labels.items()} | dict(model.regions)
    out = {}
    for name, values in groups.items():
        a, b = np.isin(reference, values), np.isin(found, values)
        if a.any() or b.any():
            out[name] = 2 * (a & b).sum() / (a.sum() + b.sum())
    return out


def _bench_bundle(name: str, args, results: dict) -> None:
    import torch

    from pipelines.batch.bundle import BundleModel
    from pipelines.inference.runtimes import Int8Model, OpenVinoNetwork, inferer_window
    from pipelines.networks import cpu_inference

    manifest, folder, key = BUNDLES[name]
    model = BundleModel(ROOT / "bundles" / name)
    network, window = model.network, inferer_window(model.inferer)
    runners = {"torch": network,
               "openvino": OpenVinoNetwork(network, model.bundle_sha256, name, threads=args.threads)}
    try:
        int8 = Int8Model.of_bundle(model.root, model.weights_sha256, network.in_channels, window)
        runners["openvino-int8"] = OpenVinoNetwork(network, "", name, threads=args.threads, model_file=int8.xml,
                                                   window=int8.window)
    except ValueError as exc:
        print(f"{name}: no openvino-int8 ({exc})")
    x = torch.randn(1, network.in_channels, *window)

    def call(runner):
        if runner is network:
            with torch.inference_mode(), cpu_inference(network):
                return network(x)
        return runner(x)

    for runner in runners.values():
        call(runner)  # converted or compiled before the timing
    data = None if args.quick else _study(model, ROOT / "data_manifests" / manifest, args.data_root / folder, key)
    for load in (False, True):
        condition = "one CPU-bound process beside" if load else "idle"
        per_window = {k: [] for k in runners}
        per_volume = {k: [] for k in runners}
        labels = {}
        rounds = 1 if args.quick else args.rounds
        with _competing(load):
            for _ in range(rounds):
                for runtime, runner in runners.items():
                    per_window[runtime].append(_timed(lambda r=runner: call(r), 1 if args.quick else args.window_repeats))
                if data is None:
                    continue
                for runtime, runner in runners.items():
                    model.runner = runner
                    start = time.perf_counter()
                    labels[runtime] = model.predict(data)[0].numpy()
                    per_volume[runtime].append(time.perf_counter() - start)
        window_ms = {k: 1000 * statistics.median(v) for k, v in per_window.items()}
        shape = "x".join(map(str, window))
        print(f"{name}, {condition}: per {shape} window: " + ", ".join(
            f"{k} {v:.0f} ms ({window_ms['torch'] / v:.2f}x)" for k, v in window_ms.items()))
        results[(name, load, "window")] = window_ms
        if data is None:
            continue
        volume_s = {k: statistics.median(v) for k, v in per_volume.items()}
        print(f"{name}, {condition}: per volume {tuple(data[model.network_input_key].shape[1:])}: " + ", ".join(
            f"{k} {v:.2f} s ({volume_s['torch'] / v:.2f}x)" for k, v in volume_s.items()))
        results[(name, load, "volume")] = volume_s
        for runtime in runners:
            if runtime != "torch":
                dice = _dice(model, labels["torch"], labels[runtime])
                print(f"  {runtime} against torch, Dice: " + ", ".join(f"{k} {v:.4f}" for k, v in dice.items()))
    for what in ("window", "volume"):
        if (name, True, what) in results:
            idle, loaded = results[(name, False, what)], results[(name, True, what)]
            print(f"{name}: per {what}, under load / idle: "
                  + ", ".join(f"{k} {loaded[k] / idle[k]:.2f}x" for k in idle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", nargs="+", default=list(BUNDLES), choices=list(BUNDLES))
    parser.add_argument("--data-root", type=Path, default=ROOT, help="where demo_brain/ and demo_data/ are")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window-repeats", type=int, default=3, help="calls per window timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one round, windows only (a smoke test)")
    args = parser.parse_args()
    import torch

    from pipelines.inference.runtimes import runtime_name

    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads each, {runtime_name('openvino')}; contenders alternating, medians of "
          f"{1 if args.quick else args.rounds} round(s); (Nx): speed-up over torch")
    results: dict = {}
    for name in args.bundle:
        _bench_bundle(name, args, results)


if __name__ == "__main__":
    main()
