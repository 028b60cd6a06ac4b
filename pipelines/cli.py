"""The project's console script, ``unet-pipelines`` (also ``python -m pipelines``).

Heavy modules (torch, MONAI) are imported inside the subcommands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _shapes(args: argparse.Namespace) -> int:
    from pipelines.networks import UNet

    net = UNet(args.spatial_dims, 1, 1, features=args.features, padding=args.padding)
    dims = args.spatial_dims
    if (args.input_size is None) == (args.output_size is None):
        raise ValueError("give exactly one of --input-size and --output-size")
    if args.output_size is not None:
        wanted = _per_axis(args.output_size, dims, "--output-size")
        size = net.valid_input_shape(wanted)
    else:
        size = _per_axis(args.input_size, dims, "--input-size")
    out = net.output_shape(size)
    context = [(i - o) // 2 for i, o in zip(size, out)]
    print(f"input  {'x'.join(map(str, size))}")
    print(f"output {'x'.join(map(str, out))}")
    print(f"context per side {'x'.join(map(str, context))}; tiles align to multiples of {net.downsample_factor}")
    return 0


def _per_axis(values: Sequence[int], dims: int, flag: str) -> tuple[int, ...]:
    if len(values) == 1:
        return tuple(values) * dims
    if len(values) != dims:
        raise ValueError(f"{flag} must have 1 or {dims} values, got {len(values)}")
    return tuple(values)


def _parser() -> argparse.ArgumentParser:
    from pipelines import __version__

    parser = argparse.ArgumentParser(prog="unet-pipelines", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    shapes = commands.add_parser(
        "shapes",
        help="input and output sizes of a U-Net (valid networks take only some sizes)",
        description="Print the input/output sizes of pipelines.networks.UNet for a requested output "
        "(the smallest valid input covering it) or for a given input.",
    )
    shapes.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2)
    shapes.add_argument("--features", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    shapes.add_argument("--padding", choices=("valid", "same"), default="valid")
    shapes.add_argument("--output-size", type=int, nargs="+", help="wanted output size (1 value or one per axis)")
    shapes.add_argument("--input-size", type=int, nargs="+", help="input size to check (1 value or one per axis)")
    shapes.set_defaults(func=_shapes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a usage or input error)."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"unet-pipelines {args.command}: error: {exc}", file=sys.stderr)
        return 2
