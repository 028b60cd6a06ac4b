"""Benchmark BlendedSlidingWindowInferer against monai.inferers.sliding_window_inference (same run).

1. speed: a 3D UNet(padding="same", norm="instance", features=(16, 32, 64, 128)), the size planned
   for the tumor bundle (it must train on 2 CPU cores in minutes), on a 1x1x256x256x160 volume, roi
   96^3, overlap 0.5, Gaussian blending; median wall time of each, in fresh processes, with peak
   resident memory; and each one's mean absolute difference from a whole-volume forward pass (on a
   smaller volume that fits one pass). Both run the U-Net with its CPU inference kernels: ours swaps
   them in for its call, MONAI's is given the network after ``for_cpu_inference``.
2. memory: a 2-class 512x512x400 output (a 1x1x1 convolution as the network, so buffers dominate):
   peak resident memory of MONAI, ours in float32, float16 and streaming to disk.
3. physical limit: the network's achieved GFLOP/s (FLOPs from torch.utils.flop_counter) against
   this machine's float32 matrix-multiply GFLOP/s, measured in the same run.
4. the sw_batch_size / channels-last sweep behind the inferer's defaults (on a volume of 2x2x1 windows).
5. layers: each CPU inference kernel of pipelines.networks.layers against its torch.nn layer, at
   the sizes where it matters in the 96^3 window (median milliseconds).

Ratios are MONAI / ours for time and memory (above 1: ours is better).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import torch
torch.manual_seed(0)
config = json.loads(sys.argv[1])
from monai.inferers import sliding_window_inference
from pipelines.inference import BlendedSlidingWindowInferer
from pipelines.networks import UNet, for_cpu_inference
if config["network"] == "unet":
    net = UNet(3, 1, 3, features=tuple(config["features"]), padding="same", norm="instance", act="leakyrelu").eval()
else:
    net = torch.nn.Conv3d(1, 2, 1).eval()
if config["impl"] == "monai":
    for_cpu_inference(net)  # the same kernels ours swaps in for its call: both run the same network
shape = config["shape"]
x = torch.rand(1, 1, *shape)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if config["impl"] == "monai":
    with torch.inference_mode():
        out = sliding_window_inference(x, config["roi"], config["sw_batch_size"], net, overlap=0.5, mode="gaussian")
else:
    inferer = BlendedSlidingWindowInferer(config["roi"], overlap=0.5, sw_batch_size=config["sw_batch_size"],
                                          accumulate_dtype=config.get("dtype", "float32"),
                                          streaming_dir=config.get("streaming_dir"),
                                          channels_last=config.get("channels_last", False))
    out = inferer(x, net)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "added_mib": (peak - baseline) / 1024,
                  "out_dtype": str(out.dtype)}))
"""


def child(config: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_runs(config: dict, repeats: int) -> dict:
    return alternating({"one": config}, repeats)["one"]


def alternating(configs: dict[str, dict], repeats: int) -> dict[str, dict]:
    """Medians of each config's runs, the configs taking turns (a slow spell of a shared VM falls on all)."""
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, config in configs.items():
            runs[name].append(child(config))
    return {name: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_mib", "added_mib")}
            for name, rs in runs.items()}


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.rand(size, size), torch.rand(size, size)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def faithfulness(features: tuple[int, ...], shape: tuple[int, ...], roi: int) -> tuple[float, float]:
    import torch
    from monai.inferers import sliding_window_inference

    from pipelines.inference import BlendedSlidingWindowInferer
    from pipelines.networks import UNet, for_cpu_inference

    torch.manual_seed(0)
    net = UNet(3, 1, 3, features=features, padding="same", norm="instance", act="leakyrelu").eval()
    for_cpu_inference(net)
    x = torch.rand(1, 1, *shape)
    with torch.inference_mode():
        whole = net(x)
        monai = sliding_window_inference(x, roi, 2, net, overlap=0.5, mode="gaussian")
    ours = BlendedSlidingWindowInferer(roi, overlap=0.5, sw_batch_size=2)(x, net)
    return (ours - whole).abs().mean().item(), (monai - whole).abs().mean().item()


def network_gflops(features: tuple[int, ...], roi: int, batch: int, keep: bool) -> tuple[float, float]:
    """GFLOP per call and GFLOP/s of the network alone; ``keep``: as the inferer runs it, with freed
    memory kept for the next call (pipelines.runtime.keep_freed_memory); both with the CPU inference
    kernels, as the inferers run it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines.networks import UNet, for_cpu_inference
    from pipelines.runtime import keep_freed_memory

    net = for_cpu_inference(UNet(3, 1, 3, features=features, padding="same", norm="instance", act="leakyrelu").eval())
    x = torch.rand(batch, 1, roi, roi, roi)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(x)
    flops = counter.get_total_flops()
    times = []
    with torch.inference_mode(), keep_freed_memory(keep):
        net(x)
        for _ in range(3):
            start = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - start)
    return flops / 1e9, flops / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--streaming-dir", default="bench_output")
    parser.add_argument("--sections", nargs="+", default=["sweep", "speed", "memory", "limit", "strategy", "layers"],
                        choices=["sweep", "speed", "memory", "limit", "strategy", "layers"])
    parser.add_argument("--strategy-cases", type=int, default=8, help="validation cases of the tumor bundle")
    args = parser.parse_args(argv)
    import os

    os.makedirs(args.streaming_dir, exist_ok=True)
    if args.quick:
        features, shape, roi, memory_shape, memory_roi, faithful_shape = (4, 8, 16), [48, 40, 32], 24, [64, 64, 48], 32, (40, 40, 32)
        sweep_shape = [36, 36, 24]
    else:
        features, shape, roi, memory_shape, memory_roi, faithful_shape = (16, 32, 64, 128), [256, 256, 160], 96, [512, 512, 400], 128, (128, 128, 96)
        sweep_shape = [144, 144, 96]
    import torch

    print(f"# {torch.get_num_threads()} torch threads, torch {torch.__version__}; repeats {args.repeats}")

    # without the sweep: the best setting measured on the development machine (batch 1, channels first)
    batch, channels_last = sweep(features, sweep_shape, roi) if "sweep" in args.sections else (1, False)

    if "speed" in args.sections:
        speed(features, shape, roi, batch, channels_last, faithful_shape, args.repeats)
    if "memory" in args.sections:
        memory_table(memory_shape, memory_roi, args.streaming_dir)
    if "limit" in args.sections:
        print("\n## physical limit")
        # the network and the matmul alternate, so a slow spell of a shared VM falls on both
        fractions: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for keep in (True, False):
                gflop, achieved = network_gflops(features, roi, batch, keep)
                peak = matmul_gflops()
                fractions[keep].append(achieved / peak)
                print(f"network{' (freed memory kept, as in the inferer)' if keep else ' alone':38s}: {gflop:.1f} GFLOP per "
                      f"batch of {batch} windows, {achieved:.1f} GFLOP/s; float32 matmul {peak:.1f} GFLOP/s; "
                      f"fraction {achieved / peak:.2f}")
        print(f"achieved fraction, median of {args.repeats}: {statistics.median(fractions[True]):.2f} as the inferer runs "
              f"the network (goal >= 0.5); {statistics.median(fractions[False]):.2f} for the network alone")
    if "strategy" in args.sections:
        strategy_table(2 if args.quick else args.strategy_cases, quick=args.quick)
    if "layers" in args.sections:
        layer_table(args.repeats, quick=args.quick)
    return 0


def layer_table(repeats: int, quick: bool = False) -> None:
    """Each CPU inference kernel against its torch.nn layer (the same weights, the same input), with
    channels-first and channels-last input (the 3D U-Net runs channels-last, the 2D one channels-first)."""
    import copy

    import torch
    from torch import nn

    from pipelines.networks import layers

    size = 32 if quick else 96
    s, h = (size,) * 3, (size // 2,) * 3
    rows = [  # (what, torch.nn layer, variant, input shape)
        (f"3x3x3 conv 16->16 at {size}^3", nn.Conv3d(16, 16, 3, padding=1, bias=False), layers.OneDNNConv3d, (1, 16, *s)),
        (f"3x3x3 conv 1->16 at {size}^3", nn.Conv3d(1, 16, 3, padding=1, bias=False), layers.OneDNNConv3d, (1, 1, *s)),
        (f"1x1x1 conv 16->3 at {size}^3 (the head)", nn.Conv3d(16, 3, 1), layers.PointwiseConv3d, (1, 16, *s)),
        (f"2x2x2 up-convolution 32->16 from {size // 2}^3", nn.ConvTranspose3d(32, 16, 2, stride=2), layers.UpConv3d,
         (1, 32, *h)),
        (f"2x2x2 max pooling, 16 channels at {size}^3", nn.MaxPool3d(2, 2), layers.MaxPool2x3d, (1, 16, *s)),
    ]
    runs = max(repeats, 5)
    print(f"\n## layers: CPU inference kernel against the torch.nn layer (median ms of {runs}, inference mode)")
    print(f"{'layer':<48}{'channels-first':>18}{'channels-last':>18}")
    print(f"{'':<48}{'torch.nn  kernel':>18}{'torch.nn  kernel':>18}")
    for what, plain, variant, shape in rows:
        plain.eval()
        fast = copy.deepcopy(plain)
        fast.__class__ = variant
        x = torch.rand(shape)
        cells = []
        for data in (x, layers.channels_last(x)):
            for layer in (plain, fast):
                with torch.inference_mode():
                    layer(data)
                    times = []
                    for _ in range(runs):
                        start = time.perf_counter()
                        layer(data)
                        times.append(time.perf_counter() - start)
                cells.append(statistics.median(times) * 1e3)
        print(f"{what:<48}{cells[0]:>9.1f}{cells[1]:>9.1f}{cells[2]:>9.1f}{cells[3]:>9.1f}")


STRATEGIES = {
    # the bundle's network is same-padded; OverlapTileInferer takes valid networks only, so the
    # tiling row is its same-padding counterpart: abutting tiles, no overlap, no blending
    "tiles, no overlap (constant)": {"_target_": "pipelines.inference.BlendedSlidingWindowInferer", "roi_size": "@patch_size",
                                     "overlap": 0.0, "mode": "constant"},
    "gaussian overlap 0.25": {"_target_": "pipelines.inference.BlendedSlidingWindowInferer", "roi_size": "@patch_size",
                              "overlap": 0.25},
    "gaussian overlap 0.5": {"_target_": "pipelines.inference.BlendedSlidingWindowInferer", "roi_size": "@patch_size",
                             "overlap": 0.5},
}


def strategy_table(cases: int, quick: bool = False) -> None:
    """Dice and speed of each tiling strategy, TTA off and on, with the tumor bundle's shipped weights
    on its validation cases (the demo data; `make bench` writes it first)."""
    import time
    from pathlib import Path

    from ignite.engine import Events
    from monai.bundle import ConfigParser

    repo = Path(__file__).resolve().parents[1]
    bundle = repo / "bundles" / "unet3d_tumor"
    if not (repo / "demo_data" / "nifti").is_dir():
        print("\n## strategy: skipped (no demo_data/: run make demo-data)")
        return
    print(f"\n## strategy: tumor bundle, shipped weights, {cases} validation cases; voxels per second of the "
          "inferred (2.5 mm) volumes")
    print(f"{'strategy':<38}{'TTA':>6}{'mean Dice':>11}{'Mvoxel/s':>10}{'equal Dice':>12}")
    rows = []
    for name, inferer in STRATEGIES.items():
        for tta in (False,) if quick else (False, True):
            parser = ConfigParser()
            parser.read_config([str(bundle / "configs" / f) for f in ("train.json", "evaluate.json")])
            parser["bundle_root"] = str(bundle)
            parser["cache_workers"] = 0
            parser["validate#dataset#data"] = f"$@val_datalist[:{cases}]"
            parser["validate#handlers"] = parser["validate#handlers"][:1]  # the checkpoint loader only
            parser["validate#inferer"] = (
                {"_target_": "pipelines.inference.TTAInferer", "inferer": inferer, "mode": "mirror"} if tta else inferer
            )
            evaluator = parser.get_parsed_content("validate#evaluator")
            voxels, seconds = [0], [0.0]

            @evaluator.on(Events.ITERATION_STARTED)
            def started(engine):
                seconds.append(-time.perf_counter())

            @evaluator.on(Events.ITERATION_COMPLETED)
            def completed(engine):
                seconds[-1] += time.perf_counter()
                voxels[0] += sum(item["pred"][0].numel() for item in engine.state.output)

            evaluator.run()
            dice = evaluator.state.metrics["val_mean_dice"]
            rows.append((name, tta, dice, voxels[0] / sum(seconds) / 1e6))
    best = max(r[2] for r in rows)
    for name, tta, dice, speed in rows:
        print(f"{name:<38}{'on' if tta else 'off':>6}{dice:>11.4f}{speed:>10.3f}{'yes' if best - dice <= 0.01 else 'no':>12}")


def sweep(features, shape, roi) -> tuple[int, bool]:
    print("\n## sw_batch_size and channels-last (ours, seconds)")
    best = None
    for batch in (1, 2, 4):
        for channels_last in (False, True):
            run = median_runs({"impl": "ours", "network": "unet", "features": features, "shape": shape, "roi": roi,
                               "sw_batch_size": batch, "channels_last": channels_last}, 1)
            print(f"sw_batch_size {batch} channels_last {channels_last!s:5}: {run['seconds']:8.2f}")
            if best is None or run["seconds"] < best[0]:
                best = (run["seconds"], batch, channels_last)
    return best[1], best[2]


def speed(features, shape, roi, batch, channels_last, faithful_shape, repeats) -> None:
    print(f"\n## speed: {'x'.join(map(str, shape))}, roi {roi}^3, overlap 0.5, gaussian, UNet{features}")
    common = {"network": "unet", "features": features, "shape": shape, "roi": roi}
    configs = {"monai": {**common, "impl": "monai", "sw_batch_size": 1},
               "ours": {**common, "impl": "ours", "sw_batch_size": batch, "channels_last": channels_last}}
    if batch != 1:
        configs["monai_batched"] = {**common, "impl": "monai", "sw_batch_size": batch}
    results = alternating(configs, repeats)
    monai, ours = results["monai"], results["ours"]
    monai_batched = results.get("monai_batched", monai)
    print(f"{'':34s} {'seconds':>8s} {'peak MiB':>9s}")
    print(f"{'MONAI (sw_batch_size 1, default)':34s} {monai['seconds']:8.2f} {monai['peak_mib']:9.0f}")
    if batch != 1:
        print(f"{f'MONAI (sw_batch_size {batch})':34s} {monai_batched['seconds']:8.2f} {monai_batched['peak_mib']:9.0f}")
    print(f"{f'ours (sw_batch_size {batch}, cl {channels_last})':34s} {ours['seconds']:8.2f} {ours['peak_mib']:9.0f}")
    print(f"speed-up vs MONAI default: {monai['seconds'] / ours['seconds']:.2f}x (goal >= 1.5); "
          f"vs MONAI at the same batch: {monai_batched['seconds'] / ours['seconds']:.2f}x; "
          f"peak RSS ours/MONAI: {ours['peak_mib'] / monai['peak_mib']:.2f} (goal <= 1)")
    ours_error, monai_error = faithfulness(features, faithful_shape, roi)
    print(f"mean |difference| from a whole-volume pass ({'x'.join(map(str, faithful_shape))}): "
          f"ours {ours_error:.5f}, MONAI {monai_error:.5f} (goal: ours <= MONAI)")


def memory_table(memory_shape, memory_roi, streaming_dir) -> None:
    print(f"\n## memory: 2-class {'x'.join(map(str, memory_shape))} output, roi {memory_roi}^3, 1x1x1 conv network")
    # one window per call: a batch of windows makes oneDNN pad the 1x1x1 convolution's 1 and 2 channels to 16,
    # about 1 GB for four 128^3 windows, which would measure the network rather than the inferers' buffers
    memory = {"network": "conv", "shape": memory_shape, "roi": memory_roi, "sw_batch_size": 1}
    rows = [
        ("MONAI (float32 output and count map)", {**memory, "impl": "monai"}),
        ("ours float32", {**memory, "impl": "ours"}),
        ("ours float16", {**memory, "impl": "ours", "dtype": "float16"}),
        ("ours streaming to disk (float16)", {**memory, "impl": "ours", "dtype": "float16", "streaming_dir": streaming_dir}),
    ]
    results = {name: median_runs(cfg, 1) for name, cfg in rows}
    base = results[rows[0][0]]
    print(f"{'':38s} {'peak MiB':>9s} {'ratio':>6s} {'added MiB':>10s} {'ratio':>6s} {'seconds':>8s}")
    for name, _ in rows:
        r = results[name]
        added_ratio = r["added_mib"] / base["added_mib"] if base["added_mib"] > 0 else float("nan")
        print(f"{name:38s} {r['peak_mib']:9.0f} {r['peak_mib'] / base['peak_mib']:6.2f} {r['added_mib']:10.0f} "
              f"{added_ratio:6.2f} {r['seconds']:8.1f}")
    print("peak: the whole process (torch and MONAI, about 535 MiB, and the 420 MiB input included); added: above the "
          "process after imports and the input. Goal: float16 or streaming at most 0.5x MONAI's peak")


if __name__ == "__main__":
    sys.exit(main())
