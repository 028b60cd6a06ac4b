"""The batch job: every case of an input through a bundle, with outputs that survive anything.

Per case, in ``<output>/<case_id>/``: ``mask.nii.gz`` (labels on the source grid), ``seg.dcm``
(DICOM SEG, for DICOM input), ``prob.nii.gz`` (class probabilities, when asked), ``qc.png``,
``qc_thumbnail.png`` (for the run report) and, written last, ``record.json``. Every file is written
under a temporary name and renamed when complete, so an interrupted run leaves either a complete
case or one that the next run redoes.

Cases are loaded and preprocessed by a pool of worker processes while the network runs on the
previous one, and written by a thread while the next one runs. On a CPU the network leaves a core
to each of these helpers while it works (:class:`pipelines.batch.cores.CoreShare`). Under
``torchrun`` each rank takes every ``world_size``-th case and rank 0 writes the run reports.

What goes wrong stops as little as it can. A study that cannot be read, preprocessed or segmented
fails alone, with its reason in its record, and so does one whose loading kills the loader process
(a decoder's ``abort()``, a segmentation fault): a fresh loader takes the cases not yet received.
When the output cannot take more (disk full, read-only, write permission lost) the run stops with
:class:`BatchAbortedError`; on SIGINT or SIGTERM with :class:`BatchInterrupted`, after ending the
loader processes and finishing the case being written. Either way the finished cases are complete
and a rerun resumes. Warnings raised while a case is loaded or written (third-party messages often
name the file) go to that case's record, never to the log.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import os
import pickle
import platform
import re
import shutil
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from pipelines.batch.cases import BatchInputError, Case, discover_cases, is_dicomweb_url
from pipelines.batch.cores import CoreShare
from pipelines.batch.measures import dice_scores, lesion_measurements
from pipelines.batch.model import BundleModel
from pipelines.batch.qc import save_qc_picture
from pipelines.batch.report import read_records, write_reports
from pipelines.engines.distributed import end_process_group
from pipelines.io.writers import atomic_path, save_nifti

__all__ = ["BatchAbortedError", "BatchInterrupted", "BatchSummary", "run_batch"]

logger = logging.getLogger(__name__)

_OUTPUTS = ("mask.nii.gz", "seg.dcm", "prob.nii.gz", "qc.png", "qc_thumbnail.png")
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}  # fatal on a path in the output only
_PARTIAL = re.compile(r"^\..+\.[0-9a-f]{32}\.part")  # pipelines.io.writers.atomic_path's temporary names
_MAX_WARNINGS = 50  # per record


class BatchAbortedError(OSError):
    """The output cannot be written (disk full, read-only, permission denied): the run stops; finished
    cases stay."""


@dataclass
class BatchSummary:
    """What a run did. ``exit_code``: 0, or 1 when every case failed (or any, with ``fail_on_error``)."""

    cases: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    exit_code: int = 0
    reports: tuple[Path, ...] = ()


class BatchInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run (the command line exits with 128 + ``signum``: 130, 143).

    The loader processes were ended, the case being written finished, the reports written for the
    finished cases; a rerun resumes. Like :class:`KeyboardInterrupt`, not caught by ``except Exception``.

    Attributes:
        signum: the signal.
        summary: what the run did until then; None when it stopped before the first case.
    """

    def __init__(self, signum: int, summary: BatchSummary | None = None) -> None:
        super().__init__(signum)
        self.signum = signum
        self.summary = summary

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        done = self.summary
        if done is None:
            return f"stopped by {name} before the first case"
        left = done.cases - done.skipped - done.done - len(done.failed)
        return (f"stopped by {name}: {done.done} cases segmented, {len(done.failed)} failed, {left} not done "
                f"({done.skipped} complete from an earlier run); the finished cases are complete, rerun to resume")


def _software() -> dict:
    import highdicom
    import monai
    import nibabel
    import pydicom

    from pipelines import __version__

    return {
        "unet_pipelines": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "nibabel": nibabel.__version__,
        "pydicom": pydicom.__version__,
        "highdicom": highdicom.__version__,
    }


def _distributed(device: str) -> tuple[int, int, bool]:
    """``(rank, world_size, joined)``; joins the torchrun process group when there is one (NCCL for
    CUDA devices, gloo otherwise: it only synchronises the ranks). ``joined``: this call created the
    group, so the run ends it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import datetime as dt

    import torch.distributed as dist

    joined = not dist.is_initialized()
    if joined:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=dt.timedelta(hours=24))  # ranks finish at different times
    return dist.get_rank(), dist.get_world_size(), joined


def _check_output(output: Path, min_free_mb: float) -> None:
    if output.exists() and not output.is_dir():
        raise BatchInputError(f"output {output} is a file, not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"  # one per process: torchrun ranks check at once
        with atomic_path(probe) as tmp:
            tmp.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise BatchInputError(f"output folder {output} is not writable: {exc.strerror or exc}") from exc
    free_mb = shutil.disk_usage(output).free / 2**20
    if free_mb < min_free_mb:
        raise BatchInputError(
            f"output folder {output} has {free_mb:.0f} MB free, less than the {min_free_mb:.0f} MB asked "
            f"(--min-free-mb); free space or write elsewhere"
        )


def _remove_partials(case_dir: Path) -> None:
    if case_dir.is_dir():
        for path in case_dir.iterdir():
            if _PARTIAL.match(path.name):
                path.unlink(missing_ok=True)


def _run_key(model: BundleModel, settings: Mapping) -> str:
    text = json.dumps({"bundle": model.bundle_sha256, "weights": model.weights_sha256, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_complete(case_dir: Path, case: Case, run_key: str) -> bool:
    try:
        record = json.loads((case_dir / "record.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        record.get("status") == "ok"
        and record.get("run_key") == run_key
        and record.get("input_hash") == case.input_hash
        and all((case_dir / name).is_file() for name in record.get("outputs", []))
    )


class _CaseLoader(torch.utils.data.Dataset):
    """Loads and preprocesses a case in a worker process; never raises (errors travel as data)."""

    def __init__(self, cases: list[Case], model: BundleModel, cache_dir: Path, cores: CoreShare | None = None) -> None:
        import multiprocessing

        self.cases = cases
        self.preprocess = model.preprocess
        self.rules = dict(model.series_rules)
        self.cache_dir = cache_dir
        self.cores = cores
        # items being made now, across the worker processes: once they are ended, those a dead
        # worker left here still count in ``cores`` (see _Loading._receive)
        self.at_work = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> bytes:
        with self.cores.working() if self.cores else nullcontext():
            with self.at_work.get_lock():
                self.at_work.value += 1
            try:
                item = self._item(index)
            finally:
                with self.at_work.get_lock():
                    self.at_work.value -= 1
            # pickled here, by value: torch's worker queue moves tensors to shared memory, which frees
            # memory that numpy views in MONAI's transform trace (e.g. Orientation's affine) still point to
            return pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)

    def _item(self, index: int) -> dict:
        case = self.cases[index]
        start = time.perf_counter()
        # third-party warnings often name the file: they go to the case's record, not to stderr
        # (entering resets the once-per-location registries: each case gets its own warnings)
        with warnings.catch_warnings(record=True) as caught:
            try:
                if case.kind == "error":
                    raise ValueError(case.error)
                source = self._load(case)
                loaded = time.perf_counter()
                image = self.preprocess(source)
                timings = {"load_s": loaded - start, "preprocess_s": time.perf_counter() - loaded}
                item = {"case": case, "source": source, "image": image, "timings": timings}
            except Exception as exc:  # one bad case never stops the run: recorded as failed
                item = {"case": case, "error": _describe(exc)}
        item["warnings"] = _distinct([_warning_text(w.message, w.category) for w in caught])
        return item

    def _load(self, case: Case):
        from pipelines.io import load_series, load_volume

        # an image to segment must hold something: a blank one would fail deep in the preprocessing
        if case.kind == "dicom":
            return load_series(case.series, case.path, allow_blank=False)
        if case.kind == "file":
            return load_volume(case.path, allow_blank=False)
        if case.kind == "dicomweb":
            from pipelines.batch.dicomweb import download_study

            folder = download_study(case.url, case.study_uid, self.cache_dir / case.case_id, self.rules)
            return load_volume(folder, **self.rules, allow_blank=False)
        raise ValueError(f"unknown case kind {case.kind!r}")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, ValueError | OSError) else f"{type(exc).__name__}: {text}"


def _first(batch):
    return batch


class _LoaderDied(Exception):
    """A loader worker process died; ``how``: ``signal SIGABRT``, ``exit code 1``, ..."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class _Loading:
    """The cases, loaded and preprocessed by ``workers`` processes (a torch DataLoader), in order.

    A worker process that dies (a decoder's ``abort()``, a segmentation fault, the out-of-memory
    killer) fails the study it was loading, not the run. With prefetching, several cases may be in
    flight when it dies, and one already sent may be lost with it; so the loader is replaced by a
    fresh one for the cases not yet received, the first of them alone: if that one dies too, the
    case is failed with the reason, else the rest follow as before.
    """

    def __init__(self, cases: list[Case], model: BundleModel, cache_dir: Path, workers: int,
                 cores: CoreShare | None) -> None:
        self.cases, self.model, self.cache_dir, self.workers, self.cores = cases, model, cache_dir, workers, cores

    def __iter__(self) -> Iterator[dict]:
        remaining = deque(self.cases)
        alone = False
        while remaining:
            try:
                with closing(self._receive(list(remaining)[:1] if alone else list(remaining))) as items:
                    for item in items:
                        remaining.popleft()
                        alone = False
                        yield item
            except _LoaderDied as death:
                if not remaining:
                    return
                case = remaining[0]
                if alone:
                    remaining.popleft()
                    alone = False
                    yield {"case": case, "error": f"the loader process died ({death.how}) while reading this study"}
                else:
                    logger.warning("%s: a loader process died (%s) with this case next; loading it again, alone",
                                   case.case_id, death.how)
                    alone = True

    def _receive(self, cases: list[Case]) -> Iterator[dict]:
        dataset = _CaseLoader(cases, self.model, self.cache_dir, self.cores if self.workers else None)
        workers = min(self.workers, len(cases))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_first,
            prefetch_factor=2 if workers else None, persistent_workers=False,
        )
        batches = iter(loader)
        deaths = _WorkerDeaths()
        with deaths.watching():
            try:
                while (payload := deaths.next(batches)) is not None:
                    yield pickle.loads(payload)
            finally:
                _end_workers(batches)
                if self.cores is not None and dataset.at_work.value > 0:  # died at work
                    self.cores.forget(dataset.at_work.value)


class _WorkerDeaths:
    """Turns torch's report of a dead DataLoader worker into :class:`_LoaderDied`, raised from the
    loader only. Torch's SIGCHLD handler raises its RuntimeError in the main thread wherever that is:
    inside the next case's inference, say, which would then fail in place of the case being loaded."""

    def __init__(self) -> None:
        self.report: str | None = None
        self._waiting = False

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Wraps torch's SIGCHLD handler (installed by the first worker iterator in the main thread);
        elsewhere torch finds a dead worker when the loader has been silent for 5 s."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        torch_handler = signal.getsignal(signal.SIGCHLD)

        def on_child(signum, frame) -> None:
            if callable(torch_handler):
                try:
                    torch_handler(signum, frame)
                except RuntimeError as exc:
                    self.report = str(exc)
                    if self._waiting:
                        raise

        signal.signal(signal.SIGCHLD, on_child)
        try:
            yield
        finally:
            signal.signal(signal.SIGCHLD, torch_handler if torch_handler is not None else signal.SIG_DFL)

    def next(self, batches) -> bytes | None:
        """The next payload of ``batches``, None at its end."""
        if self.report:
            raise _LoaderDied(_how_it_died(self.report))
        self._waiting = True
        try:
            return next(batches)
        except StopIteration:
            return None
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            raise _LoaderDied(_how_it_died(self.report or str(exc))) from exc
        finally:
            self._waiting = False


def _how_it_died(report: str) -> str:
    """``signal SIGABRT`` from torch's "DataLoader worker (pid N) is killed by signal: Aborted." """
    killed = re.search(r"killed by signal: (.+?)\.", report)
    if killed:
        names = [s.name for s in signal.Signals if signal.strsignal(s) == killed.group(1)]
        if names == ["SIGKILL"]:
            return "signal SIGKILL, as the out-of-memory killer sends"
        return f"signal {names[0]}" if names else f"signal: {killed.group(1)}"
    code = re.search(r"exit code (-?\d+)", report)
    return f"exit code {code.group(1)}" if code else "cause unknown"


def _end_workers(batches) -> None:
    """Ends a DataLoader iterator's worker processes now, as torch does when the iterator is garbage
    collected (its private ``_shutdown_workers``: asks them to stop, terminates those still busy after
    5 s). A run stopped by a signal must not leave that to chance: a worker left behind keeps the
    caller's stdout open."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class _CaseWarnings:
    """Sends the warnings raised in a thread of this process to the case that thread works on, for its
    record: third-party messages (pydicom, nibabel, MONAI) often name the file, which may name the
    patient. Outside a case they are shown as before. The loader processes keep their own (_CaseLoader)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._show_before = warnings.showwarning

    @contextmanager
    def installed(self) -> Iterator[None]:
        """For the run, from the main thread (``warnings.showwarning`` is process-wide)."""
        with warnings.catch_warnings():
            self._show_before = warnings.showwarning
            warnings.showwarning = self._show
            yield

    @contextmanager
    def into(self, sink: list[str]) -> Iterator[None]:
        """Warnings raised in this thread meanwhile are appended to ``sink``."""
        self._local.sink = sink
        try:
            yield
        finally:
            self._local.sink = None

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        sink = getattr(self._local, "sink", None)
        if sink is None:
            self._show_before(message, category, filename, lineno, file, line)
        else:
            sink.append(_warning_text(message, category))


def _warning_text(message, category) -> str:
    return f"{category.__name__}: {message}"


def _distinct(texts: list[str]) -> list[str]:
    """``texts`` without repeats, at most ``_MAX_WARNINGS`` and a line saying how many more."""
    texts = list(dict.fromkeys(texts))
    if len(texts) > _MAX_WARNINGS:
        texts = [*texts[:_MAX_WARNINGS], f"... and {len(texts) - _MAX_WARNINGS} more warnings"]
    return texts


def _record_warnings(case: Case, caught: list[str]) -> list[str]:
    """The case's warnings: from the scan of its headers (``Case.warnings``), its loading and writing."""
    return _distinct([*getattr(case, "warnings", []), *caught])


def _fatal(exc: BaseException, output: Path) -> bool:
    """Whether ``exc`` means that the output cannot take more: full, read-only, or write permission
    lost there (EACCES/EPERM on a path outside ``output``, e.g. a reference label, fails the case only)."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in _FULL_ERRNOS:
        return True
    return exc.errno in _DENIED_ERRNOS and _inside(exc.filename, output)


def _inside(path, folder: Path) -> bool:
    if path is None:
        return True  # a write that failed without naming its file
    try:
        return Path(os.fsdecode(path)).resolve().is_relative_to(folder.resolve())
    except (OSError, TypeError, ValueError):
        return True


class _Writer:
    """Writes one case's outputs and record (in a thread, while the next case runs)."""

    def __init__(self, output: Path, model: BundleModel, run_key: str, settings: dict, push_url: str | None) -> None:
        self.output, self.model, self.run_key, self.settings = output, model, run_key, settings
        self.push_url = push_url
        self.software = _software()

    def _base(self, case: Case) -> dict:
        return {
            "case_id": case.case_id,
            "source": case.source(),
            "input_hash": case.input_hash,
            "model": self.model.describe(),
            "settings": self.settings,
            "run_key": self.run_key,
            "software": self.software,
        }

    def _clear(self, case_dir: Path) -> None:
        for name in ("record.json", *_OUTPUTS):
            (case_dir / name).unlink(missing_ok=True)

    def failed(self, case: Case, error: str, timings: Mapping | None = None, caught: list[str] = ()) -> dict:
        case_dir = self.output / case.case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        self._clear(case_dir)
        record = {**self._base(case), "status": "failed", "error": error, "outputs": [],
                  "timings": dict(timings or {}), "warnings": _record_warnings(case, list(caught)), "finished": _now()}
        self._write_record(case_dir, record)
        # the reason can hold file or folder names, which may name the patient: it goes to the record only
        logger.warning("%s: failed; the reason is in %s/record.json", case.case_id, case.case_id)
        return record

    def ok(self, case: Case, source, labels: torch.Tensor, probs: torch.Tensor | None, timings: dict,
           caught: list[str] = ()) -> dict:
        """``caught``: the case's warnings so far; this thread's go there too (see _CaseWarnings)."""
        from pipelines.io import dicom_references, geometry_corrections, load_volume
        from pipelines.io.writers import resample_labels

        start = time.perf_counter()
        case_dir = self.output / case.case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        self._clear(case_dir)
        affine = np.asarray(source.affine, dtype=np.float64)
        label_map = labels[0].numpy()
        if label_map.shape != tuple(source.shape[1:]):
            raise RuntimeError(f"prediction grid {label_map.shape} differs from the source's {tuple(source.shape[1:])}")
        outputs = ["mask.nii.gz"]
        save_nifti(label_map, affine, case_dir / "mask.nii.gz", dtype=np.uint8)
        if probs is not None:
            save_nifti(probs.numpy(), affine, case_dir / "prob.nii.gz", dtype=np.float32)
            outputs.append("prob.nii.gz")
        record = self._base(case)
        pushed = None
        if dicom_references(source.meta) and self.model.segments:
            from pipelines.io.dicom_seg import write_dicom_seg

            write_dicom_seg(labels, source.meta, self.model.segments, case_dir / "seg.dcm",
                            algorithm_name=self.model.name, algorithm_version=self.model.version,
                            omit_empty_frames=True)
            outputs.append("seg.dcm")
            if self.push_url:
                from pipelines.batch.dicomweb import push_instance

                pushed = push_instance(self.push_url, case_dir / "seg.dcm")
        measures = lesion_measurements(label_map, affine, self.model.labels)
        largest = measures["largest_lesion"]
        caption = f"{case.case_id}  " + "  ".join(f"{k} {v:.1f} mL" for k, v in measures["volumes_ml"].items())
        save_qc_picture(case_dir / "qc.png", source[0].numpy(), label_map, affine,
                        point=largest["centre_voxel"] if largest else None, caption=caption,
                        thumbnail=case_dir / "qc_thumbnail.png")
        outputs += ["qc.png", "qc_thumbnail.png"]
        if case.label:
            reference = load_volume(case.label)
            on_grid = resample_labels(reference.numpy(), np.asarray(reference.affine), label_map.shape, affine)
            record["dice"] = dice_scores(label_map, on_grid, self.model.labels)
        timings = dict(timings, write_s=time.perf_counter() - start)
        timings["total_s"] = sum(v for k, v in timings.items() if k != "total_s")
        record.update({
            "status": "ok",
            "error": None,
            "outputs": outputs,
            **measures,
            "grid": {"shape": list(label_map.shape), "spacing_mm": [round(float(s), 4) for s in np.linalg.norm(affine[:3, :3], axis=0)]},
            "geometry_corrections": geometry_corrections(source.meta),
            "pushed": pushed,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "warnings": _record_warnings(case, list(caught)),
            "finished": _now(),
        })
        self._write_record(case_dir, record)
        logger.info("%s: ok (%s)", case.case_id, ", ".join(f"{k} {v} mL" for k, v in measures["volumes_ml"].items()))
        return record

    @staticmethod
    def _write_record(case_dir: Path, record: dict) -> None:
        with atomic_path(case_dir / "record.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_batch(
    bundle: str | os.PathLike,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    workers: int = 1,
    device: str = "cpu",
    tta: bool = False,
    probabilities: bool = False,
    rules: Mapping | None = None,
    section: str = "test",
    dataset_dir: str | os.PathLike | None = None,
    image_key: str | None = None,
    push: bool = False,
    fail_on_error: bool = False,
    min_free_mb: float = 100.0,
    progress: bool = False,
) -> BatchSummary:
    """Segment every case of ``source`` with the bundle; see the module docstring for the outputs.

    Args:
        bundle: bundle folder (its ``configs/inference.json`` and ``models/model.pt``).
        source: folder tree, manifest or DICOMweb URL (see :func:`pipelines.batch.discover_cases`).
        output: output folder (created).
        workers: loading/preprocessing worker processes (0: in the main process, no prefetching).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun, ``cuda`` means the local rank's GPU).
        tta: mirroring test-time augmentation.
        probabilities: also write ``prob.nii.gz``.
        rules: DICOM series selection rules, over the bundle's ``series_rules``.
        section, dataset_dir, image_key: for manifest input.
        push: store each DICOM SEG back to the DICOMweb ``source`` (STOW-RS).
        fail_on_error: exit code 1 when any case failed (default: only when all failed).
        min_free_mb: refuse to start with less free space on the output's disk.
        progress: show a progress bar with ETA.

    Raises:
        BatchInputError: unusable input or output, before any work.
        BatchAbortedError: the output disk filled up, became read-only or refused permission during the run.
        BatchInterrupted: SIGINT or SIGTERM (when called from the main thread, and the caller left
            their handlers at Python's defaults).
    """
    output = Path(output)
    with _stopped_by_signals():
        if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(torch.device(device))  # before NCCL joins: one GPU per rank
        rank, world, joined = _distributed(device)
        if push and not is_dicomweb_url(source):
            raise BatchInputError("--push stores DICOM SEGs back to a DICOMweb input; the input is not a URL")
        _check_output(output, min_free_mb)
        model = BundleModel(bundle, device=device, tta=tta)
        model.series_rules = {**model.series_rules, **(rules or {})}
        cases = discover_cases(source, model.series_rules, section=section, dataset_dir=dataset_dir,
                               image_key=image_key)
        settings = {"tta": tta, "probabilities": probabilities, "series_rules": model.series_rules, "push": push}
        run_key = _run_key(model, settings)
        mine = cases[rank::world]
        todo = []
        for case in mine:
            _remove_partials(output / case.case_id)
            if not _is_complete(output / case.case_id, case, run_key):
                todo.append(case)
        summary = BatchSummary(cases=len(mine), skipped=len(mine) - len(todo))
        logger.info("rank %d/%d: %d cases, %d complete from an earlier run, %d to do", rank, world, len(mine),
                    summary.skipped, len(todo))
        writer = _Writer(output, model, run_key,
                         {**settings, "device": str(model.device), "rank": rank, "world_size": world},
                         str(source) if push else None)
        try:
            _segment_cases(todo, model, writer, summary, workers=workers, probabilities=probabilities,
                           progress=progress)
        except BatchInterrupted as stop:
            stop.summary = summary
            _wind_up(output, todo, summary, rank)
            raise
        if joined:
            end_process_group()  # waits for every rank
        elif world > 1:
            import torch.distributed as dist

            dist.barrier()
        if rank == 0:
            summary.reports = write_reports(output)
            records = {r["case_id"]: r for r in read_records(output)}
            statuses = [records.get(c.case_id, {}).get("status") for c in cases]
        else:
            statuses = [r.get("status") for r in read_records(output) if r.get("case_id") in {c.case_id for c in mine}]
    all_failed = statuses and all(s != "ok" for s in statuses)
    summary.exit_code = 1 if all_failed or (fail_on_error and any(s != "ok" for s in statuses)) else 0
    return summary


def _segment_cases(todo: list[Case], model: BundleModel, writer: _Writer, summary: BatchSummary, *,
                   workers: int, probabilities: bool, progress: bool) -> None:
    """The loop: each case loaded by the worker processes, through the network here, and written by a
    thread while the next one runs. However the loop ends, the loader processes are ended and the
    case being written is finished."""
    from tqdm.auto import tqdm

    cores = CoreShare() if model.device.type == "cpu" else None
    loading = _Loading(todo, model, writer.output / ".cache", workers, cores)
    warned = _CaseWarnings()
    serving = cores.serving(model.network) if cores else nullcontext()
    with _long_lived_frozen(), serving, warned.installed(), \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-writer") as pool:
        pending: Future | None = None
        bar = tqdm(total=len(todo), unit="case", desc="segmenting", disable=not progress, dynamic_ncols=True)
        try:
            with closing(iter(loading)) as items:
                for item in items:
                    record, written = _segment(item, model, writer, warned, probabilities)
                    if pending is not None:
                        finished, pending = pending.result(), None
                        _collect(finished, summary)
                    if record is not None:
                        _collect(record, summary)
                    else:
                        pending = pool.submit(_write_safely, writer, cores, warned, *written)
                    bar.update(1)
        finally:
            bar.close()
            try:
                if pending is not None and pending.exception() is None:  # waits for the case being written
                    _collect(pending.result(), summary)
            finally:
                _clear_cache(writer.output / ".cache", todo)


def _segment(item: dict, model: BundleModel, writer: _Writer, warned: _CaseWarnings,
             probabilities: bool) -> tuple[dict | None, tuple | None]:
    """A loaded case through the network (main thread): ``(failure record, None)``, or ``(None, what
    :func:`_write_safely` takes after its first three arguments)``."""
    case, caught = item["case"], item.get("warnings", [])
    with warned.into(caught):
        if "error" in item:
            return _record_failure(writer, case, item["error"], caught=caught), None
        try:
            start = time.perf_counter()
            labels, probs = model.predict(item["image"], probabilities=probabilities)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory on one huge study
            return _record_failure(writer, case, _describe(exc), item["timings"], caught), None
    timings = dict(item["timings"], inference_s=time.perf_counter() - start)
    return None, (case, item["source"], labels, probs, timings, caught)


def _wind_up(output: Path, todo: list[Case], summary: BatchSummary, rank: int) -> None:
    """After a signal stopped the run: no temporary file left (the main thread may have been stopped
    inside a write), and the reports list the cases finished so far."""
    try:
        for case in todo:
            _remove_partials(output / case.case_id)
        if rank == 0:
            summary.reports = write_reports(output)
    except OSError as exc:  # the signal's exit code stands; a rerun removes what is left
        logger.warning("stopped; temporary files or reports could not be written or removed: %s",
                       exc.strerror or exc)


@contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise :class:`BatchInterrupted` in the main thread, so that the
    run ends its loader processes and finishes the case being written before it stops (SIGTERM would
    otherwise end this process at once and leave the loader processes behind). Only the first: a
    second signal acts as it would without the run; a rerun then cleans up as after ``kill -9``.
    Handlers the calling program installed are left alone, as is everything outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    replaced = {}

    def stop(signum, frame) -> None:
        signal.signal(signum, replaced[signum])
        raise BatchInterrupted(signum)

    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) is default:
            replaced[signum] = default
            signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)


@contextmanager
def _long_lived_frozen():
    """What is alive at the start of the loop (libraries, network, case list: about 600,000 Python
    objects) is left out of the cyclic collector's full passes until the end: each pass over them
    took 0.3 s of CPU, on the writer thread or beside the inference (2-vCPU VM)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _write_safely(writer: _Writer, cores: CoreShare | None, warned: _CaseWarnings, case: Case, source, labels,
                  probs, timings, caught: list[str]) -> dict:
    with warned.into(caught):
        try:
            with cores.working() if cores else nullcontext():
                return writer.ok(case, source, labels, probs, timings, caught)
        except Exception as exc:
            if _fatal(exc, writer.output):
                raise _aborted(writer, case, exc) from exc
            return _record_failure(writer, case, _describe(exc), timings, caught)


def _record_failure(writer: _Writer, case: Case, error: str, timings: Mapping | None = None,
                    caught: list[str] = ()) -> dict:
    try:
        return writer.failed(case, error, timings, caught)
    except OSError as exc:
        if not _fatal(exc, writer.output):
            raise
        raise _aborted(writer, case, exc) from exc


def _aborted(writer: _Writer, case: Case, exc: OSError) -> BatchAbortedError:
    """The error that stops the run: the output cannot take more (``exc`` is fatal)."""
    remedy = "restore write permission" if exc.errno in _DENIED_ERRNOS else "make room (or fix the disk)"
    return BatchAbortedError(
        exc.errno, f"cannot write case {case.case_id} to {writer.output}: {exc.strerror}; the cases finished "
        f"so far are complete; {remedy} and rerun to resume", getattr(exc, "filename", None)
    )


def _collect(record: dict, summary: BatchSummary) -> None:
    if record.get("status") == "ok":
        summary.done += 1
    else:
        summary.failed.append(record["case_id"])


def _clear_cache(cache: Path, cases: list[Case]) -> None:
    for case in cases:
        shutil.rmtree(cache / case.case_id, ignore_errors=True)
    try:
        cache.rmdir()
    except OSError:
        pass
