"""Benchmark the network's runtimes on the CPU: torch (the project's CPU path) against OpenVINO (float32).

Per window: the brain tumor bundle's network on one 64^3 window of four channels, the call alone.
Per volume: a demo brain study as the bundle's preprocessing leaves it, through the bundle's own
sliding-window inferer (windows, Gaussian blending), with each runtime, and the Dice of each region
(logit > 0) of OpenVINO's against torch's. The contenders alternate within each round, so that a
change in the machine's load meets both; medians over the rounds, and the ratio torch / OpenVINO.
OpenVINO's conversion is done before the timing (the batch job keeps it on disk). Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(call, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def _study(model, data: Path):
    """The first complete demo brain study, loaded and preprocessed as the batch job does."""
    from pipelines.batch.cases import Case
    from pipelines.batch.studies import from_manifest

    manifest = ROOT / "data_manifests" / "demo_brain.json"
    raw = json.loads(manifest.read_text())
    entry = next(e for e in raw["test"] if not e.get("dicom_missing"))
    cases = [c for c in from_manifest(manifest, "test", data, "study", model.series_rules, None)
             if c.case_id == entry["case_id"]]
    case: Case = cases[0]
    with tempfile.TemporaryDirectory() as cache:
        inputs = case.load(model.series_rules, model.load_options, Path(cache))
    return model.preprocess(inputs)[model.network_input_key].as_tensor()[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "unet3d_brain_tumor")
    parser.add_argument("--data", type=Path, default=ROOT / "demo_brain", help="the brain demo (make demo-brain)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window-repeats", type=int, default=5, help="calls per window timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one round, windows only (a smoke test)")
    args = parser.parse_args()
    import numpy as np
    import torch

    from pipelines.batch.bundle import BundleModel
    from pipelines.inference.runtimes import OpenVinoNetwork, runtime_name
    from pipelines.networks import cpu_inference

    torch.set_num_threads(args.threads)
    model = BundleModel(args.bundle)
    network = model.network
    openvino = OpenVinoNetwork(network, model.bundle_sha256, model.root.name, threads=args.threads)
    channels = network.in_channels
    window = torch.randn(1, channels, 64, 64, 64)
    openvino(window)  # converted (or read back) before the timing

    def on_torch():
        with torch.inference_mode(), cpu_inference(network):
            return network(window)

    rounds = 1 if args.quick else args.rounds
    repeats = 1 if args.quick else args.window_repeats
    per_window = {"torch": [], "openvino": []}
    for _ in range(rounds):
        per_window["torch"].append(_timed(on_torch, repeats))
        per_window["openvino"].append(_timed(lambda: openvino(window), repeats))
    print(f"machine: {torch.get_num_threads()} torch threads, {runtime_name('openvino')}, "
          f"{args.threads} threads each; {rounds} round(s), contenders alternating")
    torch_ms, ov_ms = (1000 * statistics.median(per_window[k]) for k in ("torch", "openvino"))
    print(f"per 64^3 window ({channels} channels): torch {torch_ms:.0f} ms, openvino {ov_ms:.0f} ms, "
          f"ratio {torch_ms / ov_ms:.2f}x")
    if args.quick:
        return
    image = _study(model, args.data)
    per_volume = {"torch": [], "openvino": []}
    outputs = {}
    for _ in range(rounds):
        for name, runner in (("torch", network), ("openvino", openvino)):
            start = time.perf_counter()
            with torch.inference_mode():
                outputs[name] = model.inferer(image, runner)
            per_volume[name].append(time.perf_counter() - start)
    a, b = (np.asarray(outputs[k][0]) > 0 for k in ("torch", "openvino"))
    dice = [2 * (a[c] & b[c]).sum() / max(1, a[c].sum() + b[c].sum()) for c in range(a.shape[0])]
    torch_s, ov_s = (statistics.median(per_volume[k]) for k in ("torch", "openvino"))
    print(f"per volume {tuple(image.shape[2:])} through the bundle's sliding-window inferer: torch {torch_s:.2f} s, "
          f"openvino {ov_s:.2f} s, ratio {torch_s / ov_s:.2f}x; Dice against torch per output channel "
          + ", ".join(f"{d:.4f}" for d in dice))


if __name__ == "__main__":
    main()
