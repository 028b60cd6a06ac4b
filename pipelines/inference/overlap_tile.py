"""The U-Net paper's overlap-tile strategy: seamless segmentation of any image size by a valid network.

A valid network's output is smaller than its input by its context. The image is mirrored at its
border to supply the missing context; input tiles overlap by exactly that context and output tiles
do not overlap. Tiles are placed at multiples of the network's ``downsample_factor`` so that every
tile meets the same max-pooling grid as a single pass over the whole (padded) image would: the
stitched result equals that single pass, not an approximation of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import product

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type, ensure_tuple_rep

from pipelines.inference.windows import gather_window, mirror_indices
from pipelines.networks.cpu import cpu_inference
from pipelines.runtime.heap import keep_freed_memory

__all__ = ["OverlapTileInferer", "TilePlan"]

@dataclass(frozen=True)
class TilePlan:
    """Tiling of one spatial shape for one valid network (all sizes per spatial axis).

    Attributes:
        input_tile: network input tile.
        output_tile: network output tile.
        margin: context on each side, ``(input_tile - output_tile) / 2``.
        stride: output tile spacing, a multiple of the network's ``downsample_factor``; each tile
            writes ``stride`` pixels of its output (the last tile writes what remains).
        counts: number of tiles.
    """

    input_tile: tuple[int, ...]
    output_tile: tuple[int, ...]
    margin: tuple[int, ...]
    stride: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def num_tiles(self) -> int:
        return math.prod(self.counts)


class OverlapTileInferer(Inferer):
    """MONAI ``Inferer`` that runs a valid network tile by tile with mirrored context (2D and 3D).

    The network (or its ``.module``, for DistributedDataParallel) must provide
    ``output_shape(input_shape)``, ``valid_input_shape(min_output_shape)`` and
    ``downsample_factor``, as :class:`pipelines.networks.UNet` does.

    Args:
        tile_size: requested output tile size per spatial axis (an int for all). The input tile is the
            smallest valid input whose output covers it; images smaller than a tile use one smaller tile.
        sw_batch_size: tiles per network call.
        padding_mode: how the image is extended beyond its border: ``"reflect"`` (the paper's
            mirroring), ``"symmetric"``, ``"replicate"`` or ``"constant"`` (zeros).
        progress: optional callable ``(tiles_done, tiles_total)`` called after each network call.
        reuse_memory: when the network runs on the CPU, keep the memory each tile frees in the process for
            the next tile, from the second network call on (:func:`pipelines.runtime.keep_freed_memory`;
            glibc only).

    When the network runs on the CPU, every :class:`pipelines.networks.UNet` in it takes its CPU
    inference kernels for the call (:func:`pipelines.networks.cpu_inference`; they need autograd off,
    as in an evaluator) and is left as it was found afterwards.

    Returns from ``__call__``: the stitched network output ``(B, C_out, *spatial)`` on the input's
    device, a ``MetaTensor`` with the input's metadata when the input is one.
    """

    def __init__(
        self,
        tile_size: Sequence[int] | int,
        sw_batch_size: int = 4,
        padding_mode: str = "reflect",
        progress: Callable[[int, int], None] | None = None,
        reuse_memory: bool = True,
    ) -> None:
        super().__init__()
        sizes = (tile_size,) if isinstance(tile_size, int) else tuple(tile_size)
        if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"`tile_size` must be a positive int or a sequence of them, got {tile_size!r}")
        if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
            raise ValueError(f"`sw_batch_size` must be a positive int, got {sw_batch_size!r}")
        mirror_indices(1, 0, 0, padding_mode)  # validates the mode
        self.tile_size = tile_size
        self.sw_batch_size = sw_batch_size
        self.padding_mode = padding_mode
        self.progress = progress
        self.reuse_memory = reuse_memory

    def plan(self, network: torch.nn.Module, spatial_shape: Sequence[int]) -> TilePlan:
        """The tiling this inferer uses for ``network`` on an image of ``spatial_shape``."""
        net = getattr(network, "module", network)
        missing = [a for a in ("output_shape", "valid_input_shape", "downsample_factor") if not hasattr(net, a)]
        if missing:
            raise TypeError(
                f"OverlapTileInferer needs a network with {missing} (such as pipelines.networks.UNet), "
                f"got {type(net).__name__}"
            )
        shape = tuple(int(s) for s in spatial_shape)
        factor = int(net.downsample_factor)
        tile = ensure_tuple_rep(self.tile_size, len(shape))
        target = [max(min(t, -(-n // factor) * factor), factor) for t, n in zip(tile, shape)]
        input_tile = tuple(net.valid_input_shape(target))
        output_tile = tuple(net.output_shape(input_tile))
        if output_tile == input_tile:
            raise ValueError(
                "OverlapTileInferer needs a valid (unpadded) network whose output is smaller than its input; "
                "for a same-padding network use a sliding-window inferer"
            )
        if any((i - o) % 2 for i, o in zip(input_tile, output_tile)):
            raise ValueError(f"network context must be symmetric, got input {input_tile} -> output {output_tile}")
        margin = tuple((i - o) // 2 for i, o in zip(input_tile, output_tile))
        stride = tuple(o // factor * factor for o in output_tile)
        counts = tuple(-(-n // s) for n, s in zip(shape, stride))
        return TilePlan(input_tile, output_tile, margin, stride, counts)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """Stitched output of ``network(tile, *args, **kwargs)`` over ``inputs`` ``(B, C, *spatial)``."""
        if not isinstance(inputs, torch.Tensor) or inputs.ndim not in (4, 5):
            raise ValueError(
                f"inputs must be a tensor (B, C, *spatial) with 2 or 3 spatial axes, got {getattr(inputs, 'shape', type(inputs))}"
            )
        data = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        spatial = tuple(data.shape[2:])
        plan = self.plan(network, spatial)
        jobs = [(b, starts) for b in range(data.shape[0]) for starts in product(*(range(c) for c in plan.counts))]
        output: torch.Tensor | None = None
        with ExitStack() as stack:
            if data.device.type == "cpu":
                stack.enter_context(cpu_inference(network))  # the U-Net's CPU kernels, for this call
            for first in range(0, len(jobs), self.sw_batch_size):
                chunk = jobs[first : first + self.sw_batch_size]
                tiles = torch.stack([
                    gather_window(data[b], [k * s - m for k, s, m in zip(starts, plan.stride, plan.margin)],
                                  plan.input_tile, self.padding_mode)
                    for b, starts in chunk
                ])
                result = network(tiles, *args, **kwargs)
                if not isinstance(result, torch.Tensor):
                    raise TypeError(f"OverlapTileInferer needs a network that returns a tensor, got {type(result).__name__}")
                if tuple(result.shape[2:]) != plan.output_tile:
                    raise ValueError(
                        f"network returned tiles of {tuple(result.shape[2:])} for input tiles {plan.input_tile}; "
                        f"its output_shape() promised {plan.output_tile}"
                    )
                if output is None:
                    dtype = result.dtype if result.is_floating_point() else torch.float32
                    output = torch.zeros((data.shape[0], result.shape[1], *spatial), dtype=dtype, device=data.device)
                    # after the output, which outlives the call and must not hold pages of the kept heap
                    stack.enter_context(keep_freed_memory(self.reuse_memory and data.device.type == "cpu"))
                for (b, starts), tile in zip(chunk, result):
                    target = [slice(k * s, min(k * s + s, n)) for k, s, n in zip(starts, plan.stride, spatial)]
                    source = [slice(0, t.stop - t.start) for t in target]
                    output[(b, slice(None), *target)] = tile[(slice(None), *source)].to(output)
                if self.progress is not None:
                    self.progress(min(first + self.sw_batch_size, len(jobs)), len(jobs))
        if isinstance(inputs, MetaTensor):
            return convert_to_dst_type(output, inputs, dtype=output.dtype)[0]
        return output
