"""Sliding-window inference with Gaussian blending, lean in memory, for same and valid networks.

Windows are placed evenly (every region gets the same coverage, as in nnU-Net). Each window's
prediction is multiplied by its share of every voxel, a product of per-axis weights
``g(x - s) / N(x)`` (see :func:`pipelines.inference.windows.blend_weights_1d`), and added into the
output. The shares sum to 1, so the output needs no normalisation map and no final division, and
can be accumulated in float16 or bfloat16, or streamed into a disk-backed array.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from itertools import combinations, product

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type, ensure_tuple_rep

from pipelines.inference.windows import blend_weights_1d, even_starts, gather_window, mirror_indices
from pipelines.networks.cpu import cpu_inference
from pipelines.runtime.heap import keep_freed_memory

__all__ = ["BlendedSlidingWindowInferer"]

_MODES = ("gaussian", "constant")
_ACCUMULATE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BlendedSlidingWindowInferer(Inferer):
    """MONAI ``Inferer`` over windows of ``roi_size``, blended with a Gaussian (or averaged).

    Args:
        roi_size: window size per spatial axis (an int for all). For a valid network (one with
            ``output_shape``, as :class:`pipelines.networks.UNet` with ``padding="valid"``) this is the
            output window; its input window adds the network's context, mirrored at the border.
        overlap: least overlap between neighbouring windows, as a fraction of the window.
        sigma_scale: Gaussian standard deviation as a fraction of the window (nnU-Net: 1/8).
        sw_batch_size: windows per network call. 1 by default: on the development CPU (benchmarks),
            batching helps the small convolutions but slows the large ones, and oneDNN pads few
            channels to 16 in batched calls, which costs memory.
        mode: ``"gaussian"`` or ``"constant"`` (plain average).
        padding_mode: how windows that leave the image are filled: ``"reflect"``, ``"symmetric"``,
            ``"replicate"`` or ``"constant"`` (zeros).
        sw_device: device the network runs on (default: the input's).
        device: device the output is stitched on (default: the input's); e.g. windows on the GPU,
            stitching on the CPU when the volume does not fit.
        accumulate_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``: the output's dtype.
        streaming_dir: a folder for a disk-backed output (numpy memmap; float32 or float16): for
            outputs that do not fit in memory. The file is unlinked at once and lives as long as
            the returned tensor.
        tta_axes: spatial axes to mirror for test-time augmentation (every subset, averaged).
        autocast: run the network under CUDA autocast (float16) when ``sw_device`` is a GPU.
        channels_last: pass windows in channels-last memory format.
        progress: optional callable ``(windows_done, windows_total)``.
        reuse_memory: when the network runs on the CPU, keep the memory each window frees in the process
            for the next window instead of giving it back to the system and page-faulting it in
            again (:func:`pipelines.runtime.keep_freed_memory`; glibc only), from the second
            network call on, once the output is allocated. The kept memory is returned when the
            call ends.

    When the network runs on the CPU, every :class:`pipelines.networks.UNet` in it takes its CPU
    inference kernels for the call (:func:`pipelines.networks.cpu_inference`) and is left as it was
    found afterwards.

    Returns from ``__call__``: the blended output ``(B, C_out, *spatial)`` (a tuple or dict of them
    for networks that return several), a ``MetaTensor`` with the input's metadata when the input is
    one. No gradients flow through it: it runs in ``torch.inference_mode``.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        overlap: float = 0.5,
        sigma_scale: float = 0.125,
        sw_batch_size: int = 1,
        mode: str = "gaussian",
        padding_mode: str = "reflect",
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        accumulate_dtype: str = "float32",
        streaming_dir: str | os.PathLike | None = None,
        tta_axes: Sequence[int] | None = None,
        autocast: bool = True,
        channels_last: bool = False,
        progress: Callable[[int, int], None] | None = None,
        reuse_memory: bool = True,
    ) -> None:
        super().__init__()
        sizes = (roi_size,) if isinstance(roi_size, int) else tuple(roi_size)
        if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"`roi_size` must be a positive int or a sequence of them, got {roi_size!r}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"`overlap` must be in [0, 1), got {overlap!r}")
        if sigma_scale <= 0:
            raise ValueError(f"`sigma_scale` must be positive, got {sigma_scale!r}")
        if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
            raise ValueError(f"`sw_batch_size` must be a positive int, got {sw_batch_size!r}")
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}")
        mirror_indices(1, 0, 0, padding_mode)  # validates the padding mode
        if accumulate_dtype not in _ACCUMULATE:
            raise ValueError(f"`accumulate_dtype` must be one of {tuple(_ACCUMULATE)}, got {accumulate_dtype!r}")
        if streaming_dir is not None and accumulate_dtype == "bfloat16":
            raise ValueError("`streaming_dir` stores float32 or float16 (numpy has no bfloat16)")
        self.roi_size = roi_size
        self.overlap = overlap
        self.sigma_scale = sigma_scale
        self.sw_batch_size = sw_batch_size
        self.mode = mode
        self.padding_mode = padding_mode
        self.sw_device = sw_device
        self.device = device
        self.accumulate_dtype = _ACCUMULATE[accumulate_dtype]
        self.streaming_dir = streaming_dir
        self.tta_axes = None if tta_axes is None else tuple(tta_axes)
        self.autocast = autocast
        self.channels_last = channels_last
        self.progress = progress
        self.reuse_memory = reuse_memory

    # ---- geometry ------------------------------------------------------------------------------
    def _windows(self, network, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(input window, output window, context per side) for ``network``."""
        roi = tuple(ensure_tuple_rep(self.roi_size, len(spatial)))
        net = getattr(network, "module", network)
        if hasattr(net, "output_shape") and hasattr(net, "valid_input_shape"):
            size = tuple(net.valid_input_shape(roi))
            out = tuple(net.output_shape(size))
            if out != size:  # a valid network: the window is its output, the input adds context
                return size, out, tuple((i - o) // 2 for i, o in zip(size, out))
        return roi, roi, (0,) * len(spatial)

    # ---- inference -----------------------------------------------------------------------------
    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs):
        if not isinstance(inputs, torch.Tensor) or inputs.ndim not in (4, 5):
            raise ValueError(
                f"inputs must be a tensor (B, C, *spatial) with 2 or 3 spatial axes, got {getattr(inputs, 'shape', type(inputs))}"
            )
        data = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        spatial = tuple(data.shape[2:])
        in_win, out_win, margin = self._windows(network, spatial)
        sw_device = torch.device(self.sw_device) if self.sw_device is not None else data.device
        device = torch.device(self.device) if self.device is not None else data.device
        starts = [even_starts(n, w, self.overlap) for n, w in zip(spatial, out_win)]
        weights = [
            blend_weights_1d(n, w, s, self.sigma_scale, self.mode == "gaussian")
            for n, w, s in zip(spatial, out_win, starts)
        ]
        windows = [(b, index) for b in range(data.shape[0]) for index in product(*(range(len(s)) for s in starts))]
        outputs: dict = {}
        mappings: dict = {}  # streaming: each output's memory map
        released: dict[tuple, int] = {}  # streaming: rows already dropped from memory, per output and item
        returned: type | None = None  # what the network returns: a tensor, a tuple/list or a dict
        with torch.inference_mode(), ExitStack() as stack:
            if sw_device.type == "cpu":
                stack.enter_context(cpu_inference(network))  # the U-Net's CPU kernels, for this call
            for first in range(0, len(windows), self.sw_batch_size):
                chunk = windows[first : first + self.sw_batch_size]
                batch = torch.stack([
                    gather_window(data[b], [starts[d][i] - margin[d] for d, i in enumerate(index)], in_win, self.padding_mode)
                    for b, index in chunk
                ]).to(sw_device)
                result = self._predict(network, batch, *args, **kwargs)
                parts = _as_dict(result)
                if returned is None:
                    returned = dict if isinstance(result, Mapping) else type(result)
                    for k, v in parts.items():
                        outputs[k], mappings[k] = self._allocate(data.shape[0], v.shape[1], spatial, device)
                    # after the output, which outlives the call and must not hold pages of the kept heap
                    stack.enter_context(keep_freed_memory(self.reuse_memory and sw_device.type == "cpu"))
                for k, part in parts.items():
                    if tuple(part.shape[2:]) != out_win:
                        raise ValueError(
                            f"network output {k!r} has spatial shape {tuple(part.shape[2:])}, expected the window's {out_win}"
                        )
                    self._blend(outputs[k], part.to(device), chunk, starts, weights, spatial)
                if self.streaming_dir is not None:
                    self._release_finished(outputs, mappings, windows, first + self.sw_batch_size, starts, released)
                if self.progress is not None:
                    self.progress(min(first + self.sw_batch_size, len(windows)), len(windows))
        results = {k: _finish(v, inputs) for k, v in outputs.items()}
        if returned is dict:
            return results
        if returned in (tuple, list):
            return tuple(results[i] for i in range(len(results)))
        return results[0]

    def _release_finished(self, outputs: dict, mappings: dict, windows: list, done: int, starts: list, released: dict) -> None:
        """Windows run in order of batch item, then first-axis start: rows before the next window's
        first-axis start (and whole earlier items) receive nothing more."""
        if done >= len(windows):
            item, rows = windows[-1][0] + 1, 0
        else:
            item, index = windows[done]
            rows = starts[0][index[0]]
        for key, output in outputs.items():
            finished = [(earlier, output.shape[2]) for earlier in range(item)] + [(item, rows)]
            for b, upto in finished:
                if b < output.shape[0] and upto > released.get((key, b), 0):
                    self._release(output, mappings[key], b, upto)
                    released[(key, b)] = upto

    def _predict(self, network, batch: torch.Tensor, *args, **kwargs):
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last if batch.ndim == 4 else torch.channels_last_3d)
        flips = [[]] if not self.tta_axes else [
            [a + 2 for a in subset] for n in range(len(self.tta_axes) + 1) for subset in combinations(self.tta_axes, n)
        ]
        use_autocast = self.autocast and batch.device.type == "cuda"
        total = None
        for dims in flips:
            with torch.autocast("cuda", enabled=use_autocast):
                out = network(batch.flip(dims) if dims else batch, *args, **kwargs)
            parts = {k: (v.flip(dims) if dims else v).float() for k, v in _as_dict(out).items()}
            total = parts if total is None else {k: total[k] + parts[k] for k in parts}
        averaged = {k: v / len(flips) for k, v in total.items()}
        if isinstance(out, Mapping):
            return {k: averaged[k] for k in out}
        if isinstance(out, tuple | list):
            return tuple(averaged[i] for i in range(len(out)))
        return averaged[0]

    def _allocate(self, batch: int, channels: int, spatial: tuple[int, ...], device: torch.device):
        """The zeroed output, and its ``mmap`` when it streams to disk (else None)."""
        shape = (batch, channels, *spatial)
        if self.streaming_dir is None:
            return torch.zeros(shape, dtype=self.accumulate_dtype, device=device), None
        dtype = np.float16 if self.accumulate_dtype == torch.float16 else np.float32
        handle, name = tempfile.mkstemp(prefix="blended-", suffix=".dat", dir=self.streaming_dir)
        os.close(handle)
        try:
            array = np.memmap(name, dtype=dtype, mode="w+", shape=shape)  # zero-filled by the file system
        finally:
            os.unlink(name)  # the mapping keeps the data; nothing is left behind, even after a crash
        return torch.from_numpy(array), array._mmap

    @staticmethod
    def _release(output: torch.Tensor, mapping: mmap.mmap, item: int, rows: int) -> None:
        """Drop finished rows ``[0, rows)`` of batch item ``item`` of a streamed output from this process's
        memory; they stay in the page cache and on disk (``MADV_DONTNEED`` on a shared file mapping)."""
        if rows <= 0 or not hasattr(mapping, "madvise"):
            return
        channels, row_bytes = output.shape[1], output[0, 0, 0].numel() * output.element_size()
        page = mmap.PAGESIZE
        for channel in range(channels):
            begin = (item * channels + channel) * output.shape[2] * row_bytes
            start, end = -(-begin // page) * page, (begin + rows * row_bytes) // page * page
            if end > start:
                mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _blend(self, output, parts, chunk, starts, weights, spatial) -> None:
        for (b, index), prediction in zip(chunk, parts):
            region = [slice(starts[d][i], min(starts[d][i] + prediction.shape[d + 1], spatial[d])) for d, i in enumerate(index)]
            share = None
            for d, i in enumerate(index):
                w = weights[d][i][: region[d].stop - region[d].start].to(device=prediction.device, dtype=torch.float32)
                w = w.view([-1 if axis == d else 1 for axis in range(len(index))])
                share = w if share is None else share * w
            crop = prediction[(slice(None), *(slice(0, r.stop - r.start) for r in region))]
            output[(b, slice(None), *region)] += (crop * share).to(output.dtype)


def _as_dict(result) -> dict:
    if isinstance(result, torch.Tensor):
        return {0: result}
    if isinstance(result, Mapping):
        return dict(result)
    if isinstance(result, tuple | list):
        return dict(enumerate(result))
    raise TypeError(f"network must return a tensor, a tuple or a dict of tensors, got {type(result).__name__}")


def _finish(output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    if isinstance(inputs, MetaTensor):
        return convert_to_dst_type(output, inputs, dtype=output.dtype, device=output.device)[0]
    return output

