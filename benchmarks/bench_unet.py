"""Benchmark pipelines.networks.UNet against MONAI's BasicUNet (the peer), both measured in this run.

Cases (median of --repeats timed calls after one warm-up, float32, this machine's CPU threads):
- a training step (forward, backward, Adam step) of a same-padding, instance-norm U-Net, 2D and 3D,
  against BasicUNet with the same channel widths;
- inference over one 512x512 ISBI-sized slice: the paper's overlap-tile with the shipped valid
  network against MONAI's Gaussian sliding window (overlap 0.5) with BasicUNet of the same widths.

The FLOPs of each call (torch.utils.flop_counter) are printed so the pairing can be checked.
Ratios are MONAI time / our time: above 1 means ours is faster.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import BasicUNet
from torch.utils.flop_counter import FlopCounterMode

from pipelines.inference import OverlapTileInferer
from pipelines.networks import UNet


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocator, oneDNN primitive caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gflops(fn: Callable[[], object]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def train_step(net: torch.nn.Module, shape: tuple[int, ...]) -> Callable[[], None]:
    optimizer = torch.optim.Adam(net.parameters(), 1e-4)
    x = torch.randn(shape)
    target = torch.randint(0, 2, (shape[0], *shape[2:]))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x), target)
        loss.backward()
        optimizer.step()

    return step


def basic_unet(dims: int, features: tuple[int, ...]) -> BasicUNet:
    # BasicUNet takes 6 widths: 5 encoder levels and the last decoder level
    return BasicUNet(dims, 1, 2, features=(*features, features[0]), act=("leakyrelu", {"negative_slope": 0.2}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.quick:
        widths, size2d, size3d, slice_size, roi = (4, 8, 16, 32, 64), (2, 1, 64, 64), (1, 1, 32, 32, 32), 128, 64
    else:
        widths, size2d, size3d, slice_size, roi = (16, 32, 64, 128, 256), (4, 1, 256, 256), (1, 1, 96, 96, 96), 512, 256

    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"{'case':44s} {'ours s':>9s} {'MONAI s':>9s} {'ratio':>7s} {'ours GF':>8s} {'MONAI GF':>9s}")
    rows = []
    for dims, shape in ((2, size2d), (3, size3d)):
        ours = UNet(dims, 1, 2, features=widths, padding="same", norm="instance", act="leakyrelu")
        peer = basic_unet(dims, widths)
        label = f"train step {dims}D {'x'.join(map(str, shape))}"
        rows.append((label, train_step(ours, shape), train_step(peer, shape)))

    valid = UNet(2, 1, 2, features=widths).eval()
    peer2d = basic_unet(2, widths).eval()
    image = torch.rand(1, 1, slice_size, slice_size)
    tiler = OverlapTileInferer(roi + 68 if not args.quick else roi, sw_batch_size=4)

    def ours_slice() -> None:
        with torch.inference_mode():
            tiler(image, valid)

    def monai_slice() -> None:
        with torch.inference_mode():
            sliding_window_inference(image, (roi, roi), 4, peer2d, overlap=0.5, mode="gaussian")

    rows.append((f"slice {slice_size}^2: overlap-tile vs gaussian SW 0.5", ours_slice, monai_slice))

    for label, ours_fn, peer_fn in rows:
        ours_s, peer_s = median_seconds(ours_fn, args.repeats), median_seconds(peer_fn, args.repeats)
        print(f"{label:44s} {ours_s:9.3f} {peer_s:9.3f} {peer_s / ours_s:7.2f} {gflops(ours_fn):8.1f} {gflops(peer_fn):9.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
