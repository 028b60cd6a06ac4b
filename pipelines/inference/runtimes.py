"""Where a network runs on the CPU: ``torch`` (the project's CPU path, :mod:`pipelines.networks.cpu`),
or ``openvino`` (OpenVINO, float32).

Only the network call changes: tiling, blending, test-time augmentation and postprocessing stay the
inferers'. :class:`OpenVinoNetwork` stands where the inferer expects the network: called with a batch
of windows, it returns their logits. OpenVINO compiles a model per input shape (the window and the
batch of windows). The converted model is kept on disk under a name made of the bundle's hash (its
configs, overrides and weights), the shape and OpenVINO's version, so that a run converts a network
once per shape, and a changed bundle, shape or OpenVINO gets a model of its own.

OpenVINO computes in bfloat16 on some CPUs unless told otherwise; it is told float32 here, so that
the runtime gives torch's results to within float rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["RUNTIMES", "OpenVinoNetwork", "cache_folder", "check_runtime", "on_runtime", "runtime_name"]

RUNTIMES = ("torch", "openvino")


def check_runtime(runtime: str, device: torch.device) -> None:
    """Refuses an unknown runtime, OpenVINO on a GPU (GPUs keep torch), and OpenVINO not installed.

    Raises:
        ValueError: naming the runtime and what to do.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if runtime == "openvino" and device.type != "cpu":
        raise ValueError(f"runtime 'openvino' runs on the CPU; device {device} keeps the 'torch' runtime")
    if runtime == "openvino":
        try:
            import openvino  # noqa: F401 - only whether it is installed
        except ImportError as exc:
            raise ValueError("runtime 'openvino' needs OpenVINO: pip install 'unet-pipelines[openvino]'") from exc


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
        threads: OpenVINO's inference threads (None: torch's thread count when a shape is compiled,
            which the batch job sets to its share of the cores).
        cache: the folder of converted models (default :func:`cache_folder`).
    """

    def __init__(self, network: torch.nn.Module, key: str, name: str = "network", threads: int | None = None,
                 cache: Path | None = None) -> None:
        import openvino

        self.network, self.key, self.name, self.threads = network, key, name, threads
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
        compiled = self._compiled.get(shape)
        if compiled is None:
            with self._lock:
                compiled = self._compiled.get(shape) or self._compile(shape)
                self._compiled[shape] = compiled
        out = compiled(x.detach().to("cpu", torch.float32).contiguous().numpy())[0]
        return torch.from_numpy(out)

    def _compile(self, shape: tuple[int, ...]):
        import openvino

        core = openvino.Core()
        path = self.file(shape)
        if path.is_file() and path.with_suffix(".bin").is_file():
            model = core.read_model(path)
        else:
            with torch.no_grad():
                model = openvino.convert_model(self.network.eval(), example_input=torch.zeros(shape))
            self._save(openvino, model, path)
            self.converted += 1
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": int(self.threads or torch.get_num_threads())}
        with _own_signal_stack():
            return core.compile_model(model, "CPU", config)

    @staticmethod
    def _save(openvino, model, path: Path) -> None:
        """Writes the model under temporary names, then the weights and the model into place (a reader
        finds the ``.xml`` only when its ``.bin`` is complete). A cache that cannot be written is skipped:
        the model is converted again next time."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.stem}.{os.getpid()}.xml")
            openvino.save_model(model, partial, compress_to_fp16=False)
            os.replace(partial.with_suffix(".bin"), path.with_suffix(".bin"))
            os.replace(partial, path)
        except OSError:
            pass


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


def runtime_name(runtime: str) -> str:
    """The runtime as a record states it: ``torch``, or ``openvino`` with OpenVINO's version."""
    if runtime != "openvino":
        return runtime
    import openvino

    return f"openvino {openvino.__version__.split('-')[0]}"


def on_runtime(network: torch.nn.Module, runtime: str, key: str, name: str = "network",
               threads: int | None = None) -> torch.nn.Module | OpenVinoNetwork:
    """What the inferer is to call: ``network`` itself for ``torch``, an :class:`OpenVinoNetwork` of
    it for ``openvino``."""
    return network if runtime == "torch" else OpenVinoNetwork(network, key, name, threads)
