"""Where a network runs on the CPU: ``torch`` (the project's CPU path, :mod:`pipelines.networks.cpu`),
``openvino`` (OpenVINO, float32) or ``openvino-int8`` (the bundle's int8 model, made and checked by
``unet-pipelines quantize``: :mod:`pipelines.batch.quantize`).

Only the network call changes: tiling, blending, test-time augmentation and postprocessing stay the
inferers'. :class:`OpenVinoNetwork` stands where the inferer expects the network: called with a batch
of windows, it returns their logits. OpenVINO compiles a model per input shape (the window and the
batch of windows). The converted model is kept on disk under a name made of the bundle's hash (its
configs, overrides and weights), the shape and OpenVINO's version, so that a run converts a network
once per shape, and a changed bundle, shape or OpenVINO gets a model of its own.

OpenVINO computes in bfloat16 on some CPUs unless told otherwise; it is told float32 here, so that
the runtime gives torch's results to within float rounding (int8 models: the layers left in float).
An int8 model is read from the bundle, not converted; it holds for the window size it was calibrated
on, and another is refused by name.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.io.hashing import content_hash

logger = logging.getLogger(__name__)

__all__ = [
    "INT8_MODEL", "INT8_RECORD", "RUNTIMES", "Int8Model", "OpenVinoNetwork", "RuntimeModule", "bundle_runner",
    "cache_folder", "check_runtime", "inferer_window", "int8_for", "on_runtime", "runtime_name", "save_model",
]

RUNTIMES = ("torch", "openvino", "openvino-int8")
INT8_MODEL = "model_int8.xml"  # in the bundle's models/, its weights in model_int8.bin beside it
INT8_RECORD = "model_int8.json"  # its calibration and accuracy gate (pipelines.batch.quantize)


def check_runtime(runtime: str, device: torch.device) -> None:
    """Refuses an unknown runtime, OpenVINO on a GPU (GPUs keep torch), and OpenVINO not installed.

    Raises:
        ValueError: naming the runtime and what to do.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return
    if device.type != "cpu":
        raise ValueError(f"runtime {runtime!r} runs on the CPU; device {device} keeps the 'torch' runtime")
    try:
        import openvino  # noqa: F401 - only whether it is installed
    except ImportError as exc:
        raise ValueError(f"runtime {runtime!r} needs OpenVINO: pip install 'unet-pipelines[openvino]'") from exc


@dataclass(frozen=True)
class Int8Model:
    """A bundle's int8 model as its calibration record describes it.

    Attributes:
        xml: the OpenVINO model (``models/model_int8.xml``, its weights in the ``.bin`` beside it).
        window: the spatial window shape it was calibrated on.
        record: the calibration record (``models/model_int8.json``): sample, layers kept in float,
            the accuracy gate's figures, versions.
        sha256: the ``.bin``'s hash, for the case records.
    """

    xml: Path
    window: tuple[int, ...]
    record: dict
    sha256: str

    @classmethod
    def of_bundle(cls, root: Path, weights_sha256: str, in_channels: int | None, window: tuple[int, ...] | None) -> Int8Model:
        """The int8 model of the bundle at ``root`` for its weights, channels and window.

        Raises:
            ValueError: none made (run ``unet-pipelines quantize``), made for other weights or another
                number of channels, or for another window than ``window`` (the inferer's); names the files.
        """
        xml, record_file = root / "models" / INT8_MODEL, root / "models" / INT8_RECORD
        if not (xml.is_file() and xml.with_suffix(".bin").is_file() and record_file.is_file()):
            raise ValueError(f"{root.name}: no calibrated int8 model ({xml} with its .bin and {record_file.name}): "
                             f"run `unet-pipelines quantize --bundle {root}` first")
        try:
            record = json.loads(record_file.read_text())
            made_for, channels = str(record["weights_sha256"]), int(record["in_channels"])
            calibrated = tuple(int(n) for n in record["window"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{record_file}: not a calibration record ({exc})") from exc
        if made_for != weights_sha256:
            raise ValueError(f"{xml}: quantized from other weights (sha256 {made_for[:12]}..., these are "
                             f"{weights_sha256[:12]}...): run `unet-pipelines quantize --bundle {root}` again")
        if in_channels is not None and channels != in_channels:
            raise ValueError(f"{xml}: quantized for {channels} input channels, the network takes {in_channels}")
        if window is not None and tuple(window) != calibrated:
            raise ValueError(f"{xml}: calibrated on windows of {'x'.join(map(str, calibrated))}, the inferer's are "
                             f"{'x'.join(map(str, window))}: quantize the bundle for that window size")
        return cls(xml, calibrated, record, content_hash(xml.with_suffix(".bin")))


def inferer_window(inferer, network: torch.nn.Module | None = None) -> tuple[int, ...] | None:
    """The spatial window the network is handed: the inferer's ``roi_size`` or ``tile_size`` (through
    a test-time augmentation's inner ``inferer``), or None when it says none. An overlap-tile
    inferer's ``tile_size`` names the output tile of a valid (unpadded) network: with ``network``,
    the network's input for it is returned (the tile of an image at least that large).
    """
    net = getattr(network, "module", network)
    while inferer is not None:
        for name in ("roi_size", "tile_size"):
            size = getattr(inferer, name, None)
            if isinstance(size, (list, tuple)) and all(isinstance(n, int) for n in size):
                if name == "tile_size" and getattr(net, "padding", None) == "valid":
                    return tuple(int(n) for n in net.valid_input_shape(size))
                return tuple(size)
        inferer = getattr(inferer, "inferer", None)
    return None


def cache_folder() -> Path:
    """Where converted models are kept: ``$UNET_CACHE/openvino``, else ``~/.cache/unet-pipelines/openvino``."""
    root = os.environ.get("UNET_CACHE") or Path.home() / ".cache" / "unet-pipelines"
    return Path(root) / "openvino"


class OpenVinoNetwork:
    """``network`` compiled by OpenVINO for the CPU, one compiled model per input shape, called as the
    network is (a ``(B, C, *window)`` tensor in, its logits out, float32).

    Args:
        network: the torch module, with its weights.
        key: what identifies the network and its weights (the bundle's hash).
        name: a readable part of the cached files' names (the bundle's name).
        threads: OpenVINO's inference threads (None: torch's thread count at each call, which the
            batch job sets to the network's share of the cores before it; a model is compiled for each
            shape and thread count met).
        cache: the folder of converted models (default :func:`cache_folder`).
        model_file: an OpenVINO model to run instead of converting ``network`` (the bundle's int8
            model), valid for windows of ``window`` only.
        window: the spatial shape ``model_file`` was calibrated on.
    """

    def __init__(self, network: torch.nn.Module, key: str, name: str = "network", threads: int | None = None,
                 cache: Path | None = None, model_file: Path | None = None,
                 window: tuple[int, ...] | None = None) -> None:
        import openvino

        self.network, self.key, self.name, self.threads = network, key, name, threads
        self.model_file, self.window = model_file, tuple(window) if window else None
        self.module = network  # where an inferer reads a valid network's window geometry
        self.cache = Path(cache) if cache is not None else cache_folder()
        self.version = openvino.__version__.split("-")[0]
        self._compiled: dict[tuple[int, ...], Callable] = {}
        self._lock = threading.Lock()
        self.converted = 0  # models converted from torch by this object (the others were read from the cache)

    def file(self, shape: tuple[int, ...]) -> Path:
        """The cached model (``.xml``, its weights beside it in ``.bin``) for inputs of ``shape``."""
        digest = hashlib.sha256(f"{self.key} {shape} openvino {self.version}".encode()).hexdigest()[:20]
        return self.cache / f"{self.name}-{'x'.join(map(str, shape))}-{digest}.xml"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(int(n) for n in x.shape)
        threads = int(self.threads or torch.get_num_threads())
        compiled = self._compiled.get((shape, threads))
        if compiled is None:
            with self._lock:
                compiled = self._compiled.get((shape, threads)) or self._compile(shape, threads)
                self._compiled[(shape, threads)] = compiled
        out = compiled(x.detach().to("cpu", torch.float32).contiguous().numpy())[0]
        return torch.from_numpy(out)

    def _compile(self, shape: tuple[int, ...], threads: int):
        import openvino

        core = openvino.Core()
        path = self.file(shape)
        if self.model_file is not None:
            if self.window is not None and shape[2:] != self.window:
                raise ValueError(f"{self.model_file}: calibrated on windows of {'x'.join(map(str, self.window))}, "
                                 f"got {'x'.join(map(str, shape[2:]))}: quantize the bundle for that window size")
            model = core.read_model(self.model_file)
            model.reshape(list(shape))
        elif path.is_file() and path.with_suffix(".bin").is_file():
            model = core.read_model(path)
        else:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the network's shape checks, traced as constants
                model = openvino.convert_model(self.network.eval(), example_input=torch.zeros(shape))
            try:  # a cache that cannot be written is skipped: the model is converted again next time
                save_model(model, path)
            except OSError:
                pass
            self.converted += 1
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        with _own_signal_stack():
            return core.compile_model(model, "CPU", config)

def save_model(model, path: Path) -> None:
    """Writes an OpenVINO model under temporary names, then its weights (``.bin``) and the model
    (``.xml``) into place: a reader finds the ``.xml`` only when its ``.bin`` is complete.

    Raises:
        OSError: the folder cannot be written.
    """
    import openvino

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.xml")
    openvino.save_model(model, partial, compress_to_fp16=False)
    os.replace(partial.with_suffix(".bin"), path.with_suffix(".bin"))
    os.replace(partial, path)


def int8_for(runtime: str, device: torch.device, root: Path, weights_sha256: str, in_channels: int | None,
             window: tuple[int, ...] | None) -> Int8Model | None:
    """Refuses an unusable runtime (:func:`check_runtime`); for ``openvino-int8``, the bundle's int8
    model for these weights, channels and window (:meth:`Int8Model.of_bundle`), else None.

    Raises:
        ValueError: naming the runtime or the int8 model's file and what to do.
    """
    check_runtime(runtime, device)
    return Int8Model.of_bundle(root, weights_sha256, in_channels, window) if runtime == "openvino-int8" else None


_SS_DISABLE = 2  # <signal.h>


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]  # stack_t


@contextmanager
def _own_signal_stack() -> Iterator[None]:
    """Keeps the calling thread's alternate signal stack across the block.

    OpenVINO's ``compile_model`` puts a signal stack of its own on the compiling thread and puts back
    the one it found when the compiled model is freed. Compiled models freed in another order than
    made leave the thread a stack already freed, and the next signal handled there (a child's
    SIGCHLD, with faulthandler's stack in place) kills the process with SIGSEGV. Putting ours back
    at once leaves nothing to undo out of order.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    kept = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(kept)) != 0:
        yield
        return
    try:
        yield
    finally:  # as found: the same stack, or none (SS_DISABLE)
        libc.sigaltstack(ctypes.byref(_SignalStack(kept.ss_sp, kept.ss_flags & _SS_DISABLE, kept.ss_size)), None)


class RuntimeModule(torch.nn.Module):
    """An :class:`OpenVinoNetwork` where a torch module is expected: MONAI's evaluators and MONAI
    Label's infer tasks call ``eval()`` and ``to()`` on the network, then hand it to the inferer."""

    def __init__(self, runner: OpenVinoNetwork) -> None:
        super().__init__()
        self.runner = runner  # not a module: torch neither moves nor registers it

    @property
    def module(self) -> torch.nn.Module:
        """The torch network (where an inferer reads a valid network's window geometry)."""
        return self.runner.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(x)


def bundle_runner(network: torch.nn.Module, runtime: str, bundle_root: str | os.PathLike,
                  ckpt_path: str | os.PathLike, window=None, inferer=None) -> torch.nn.Module:
    """What a bundle config's evaluator runs (config id ``runner``): ``network`` for ``torch``, else a
    :class:`RuntimeModule` of it on OpenVINO (float32, or the bundle's int8 model).

    The float model is converted at the first call, after the evaluator's checkpoint loader has put
    the weights in ``network``; the int8 model must have been made from ``ckpt_path``'s weights, for
    the window the network is handed: ``window``, or the one ``inferer`` hands it
    (:func:`inferer_window`; an overlap-tile inferer's valid network takes more than its tile).

    Raises:
        ValueError: an unknown runtime, OpenVINO missing, or an int8 model that does not fit
            (:meth:`Int8Model.of_bundle`).
    """
    if runtime == "torch":
        return network
    root, weights = Path(bundle_root).resolve(), content_hash(ckpt_path)  # "." in a bundle config: its name
    window = inferer_window(inferer, network) if window is None else tuple(int(n) for n in window)
    int8 = int8_for(runtime, next(network.parameters()).device, root, weights, getattr(network, "in_channels", None),
                    window)
    key = hashlib.sha256(f"{content_hash(root / 'configs')} {weights}".encode()).hexdigest()
    logger.info("%s: the network runs on %s (%s)", root.name, runtime_name(runtime),
                int8.xml if int8 else "converted from the weights at the first call")
    return on_runtime(network, runtime, key, root.name, model_file=int8 and int8.xml, window=int8 and int8.window)


def runtime_name(runtime: str) -> str:
    """The runtime as a record states it: ``torch``, or the runtime with OpenVINO's version."""
    if runtime == "torch":
        return runtime
    import openvino

    return f"{runtime} {openvino.__version__.split('-')[0]}"


def on_runtime(network: torch.nn.Module, runtime: str, key: str, name: str = "network",
               threads: int | None = None, model_file: Path | None = None,
               window: tuple[int, ...] | None = None) -> torch.nn.Module:
    """What the inferer is to call: ``network`` itself for ``torch``, else a :class:`RuntimeModule` of
    an :class:`OpenVinoNetwork` of it for ``openvino``, of ``model_file`` for ``openvino-int8`` (a
    module, so that :class:`~pipelines.runtime.CoreShare` sizes its threads before each call)."""
    if runtime == "torch":
        return network
    return RuntimeModule(OpenVinoNetwork(network, key, name, threads, window=window,
                                         model_file=model_file if runtime == "openvino-int8" else None))
