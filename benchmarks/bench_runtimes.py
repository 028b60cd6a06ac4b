"""Benchmark the network's runtimes on the CPU: torch (the project's CPU path), OpenVINO float32 and
the bundle's int8 model (``unet-pipelines quantize``), idle and beside a competing CPU-bound process.

For each bundle (brain tumor, tumor, ISBI 2012): per window, the network on one window of the
inferer's size, the call alone; per volume, a demo study (for ISBI a held-out EM section) as the
bundle's preprocessing leaves it through the bundle's own inferer (windows or tiles, blending or
test-time augmentation, the bundle's postprocessing), with the Dice of each label and region against
torch's, and for ISBI the pixel error of each runtime on the held-out sections. The contenders
alternate within each round, so that a change in the machine's load meets all; medians over the
rounds, and each runtime's speed-up over torch. Then the same again with one CPU-bound process
beside (a Python busy loop), and each runtime's time under load over its idle time. Each runtime runs as the batch job runs it: its threads sized
before each call (``pipelines.runtime.CoreShare``: ``--threads``, less the cores other processes keep
busy); ``--fixed-threads`` keeps them at ``--threads`` whatever the load (the setting before). OpenVINO's
conversion is done before the timing (the batch job keeps it on disk). Run it on an otherwise idle
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = {  # bundle -> (manifest, data folder under --data-root, manifest key of the study, its section,
    # whether to measure the pixel error against the section's labels)
    "unet3d_brain_tumor": ("demo_brain.json", "demo_brain", "study", "test", False),
    "unet3d_tumor": ("demo_tumor.json", "demo_data", "dicom", "test", False),
    "unet2d_isbi2012": ("isbi2012.json", "../shared/data/isbi2012", "image", "validation", True),  # a section a "volume"
}


def _timed(call, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def _studies(model, manifest: Path, data: Path, key: str, section: str, count: int,
             labels: bool) -> list[tuple[dict, object]]:
    """The first ``count`` complete studies of ``section``, loaded and preprocessed as the batch job
    does, each with its label image (``labels``) or None."""
    from monai.transforms import LoadImage

    from pipelines.batch.studies import from_manifest

    cases = list(from_manifest(manifest, section, data, key, model.series_rules, None))
    entries = [e for e in json.loads(manifest.read_text())[section] if not e.get("dicom_missing")][:count]
    out = []
    for index, entry in enumerate(entries):
        case = next(c for c in cases if c.case_id == entry["case_id"]) if "case_id" in entry else cases[index]
        with tempfile.TemporaryDirectory() as cache:
            inputs = case.load(model.series_rules, model.load_options, Path(cache))
        label = LoadImage(image_only=True)(data / entry["label"]).numpy() > 0 if labels else None
        out.append((model.preprocess(inputs), label))
    return out


@contextmanager
def _competing(load: bool, cores):
    """One CPU-bound process beside the benchmark while inside (none when ``load`` is false), started by
    a shell that exits at once (so not a child, which the job would count as its own), and measured
    by ``cores`` for two seconds before the timing starts."""
    if not load:
        yield
        return
    started = subprocess.run(["sh", "-c", f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True)
    busy = int(started.stdout)
    try:
        if cores is not None:
            cores.wanted_threads()
        time.sleep(2.0)
        if cores is not None:
            cores.wanted_threads()
        yield
    finally:
        os.kill(busy, signal.SIGKILL)


def _pixel_errors(model, runners: dict, studies: list) -> None:
    """Each runtime's pixel error against the labels, over the studies that have one (ISBI's held-out
    sections): the share of pixels whose class (membrane or cell) differs, the challenge's measure."""
    import numpy as np

    from pipelines.metrics.segmentation_errors import pixel_error

    errors = {}
    for runtime, runner in runners.items():
        model.runner = runner
        errors[runtime] = float(np.mean([pixel_error(model.predict(data)[0].numpy()[0] > 0, label)
                                         for data, label in studies if label is not None]))
    print(f"  pixel error on {sum(label is not None for _, label in studies)} held-out sections: "
          + ", ".join(f"{k} {v:.4f} ({v - errors['torch']:+.4f})" for k, v in errors.items()))


def _dice(model, reference, found) -> dict[str, float]:
    import numpy as np

    out = {}
    for name, values in model.label_groups.items():
        a, b = np.isin(reference, values), np.isin(found, values)
        if a.any() or b.any():
            out[name] = 2 * (a & b).sum() / (a.sum() + b.sum())
    return out


def _bench_bundle(name: str, args, results: dict) -> None:
    import torch

    from pipelines.batch.bundle import BundleModel
    from pipelines.inference.runtimes import Int8Model, inferer_window, on_runtime
    from pipelines.networks import cpu_inference
    from pipelines.runtime import CoreShare

    manifest, folder, key, section, labels_given = BUNDLES[name]
    model = BundleModel(ROOT / "bundles" / name)
    network, window = model.network, inferer_window(model.inferer, model.network)
    runners = {"torch": network, "openvino": on_runtime(network, "openvino", model.bundle_sha256, name)}
    try:
        int8 = Int8Model.of_bundle(model.root, model.weights_sha256, network.in_channels, window)
        runners["openvino-int8"] = on_runtime(network, "openvino-int8", "", name, model_file=int8.xml,
                                              window=int8.window)
    except ValueError as exc:
        print(f"{name}: no openvino-int8 ({exc})")
    x = torch.randn(1, network.in_channels, *window)
    cores = None if args.fixed_threads else CoreShare(args.threads)

    def served() -> ExitStack:
        """Every runtime with its threads sized before each call, as in the batch job (which serves
        its network for the whole run, not call by call)."""
        stack = ExitStack()
        for runner in runners.values():
            if cores is not None:
                stack.enter_context(cores.serving(runner))
        return stack

    def call(runner):
        with torch.inference_mode():
            if runner is network:
                with cpu_inference(network):
                    return network(x)
            return runner(x)

    for threads in range(1, args.threads + 1):  # converted, and compiled for each thread count, before the timing
        torch.set_num_threads(threads)
        for runner in runners.values():
            with torch.inference_mode():
                runner(x)
    torch.set_num_threads(args.threads)
    studies = [] if args.quick else _studies(model, ROOT / "data_manifests" / manifest, args.data_root / folder, key,
                                             section, args.sections if labels_given else 1, labels_given)
    data = studies[0][0] if studies else None
    for load in (False, True):
        condition = "one CPU-bound process beside" if load else "idle"
        per_window = {k: [] for k in runners}
        per_volume = {k: [] for k in runners}
        labels = {}
        rounds = 1 if args.quick else args.rounds
        with _competing(load, cores), served():
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
            if not load and labels_given:
                _pixel_errors(model, runners, studies)
        window_ms = {k: 1000 * statistics.median(v) for k, v in per_window.items()}
        shape = "x".join(map(str, window))
        print(f"{name}, {condition}: per {shape} window: " + ", ".join(
            f"{k} {v:.0f} ms ({window_ms['torch'] / v:.2f}x)" for k, v in window_ms.items()))
        results[(name, load, "window")] = window_ms
        if data is None:
            continue
        volume_s = {k: statistics.median(v) for k, v in per_volume.items()}
        print(f"{name}, {condition}: per {'section' if labels_given else 'volume'} "
              f"{tuple(data[model.network_input_key].shape[1:])}: " + ", ".join(
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
    parser.add_argument("--sections", type=int, default=4, help="ISBI held-out sections for the pixel error")
    parser.add_argument("--fixed-threads", action="store_true",
                        help="run on --threads whatever the machine's load (no CoreShare)")
    parser.add_argument("--quick", action="store_true", help="one round, windows only (a smoke test)")
    args = parser.parse_args()
    import torch

    from pipelines.inference.runtimes import runtime_name

    torch.set_num_threads(args.threads)
    sizing = "fixed" if args.fixed_threads else "less the cores others keep busy"
    print(f"{args.threads} threads each ({sizing}), {runtime_name('openvino')}; contenders alternating, medians of "
          f"{1 if args.quick else args.rounds} round(s); (Nx): speed-up over torch")
    results: dict = {}
    for name in args.bundle:
        _bench_bundle(name, args, results)


if __name__ == "__main__":
    main()
