"""The batch job: every case of an input through a bundle, with outputs that survive anything.

``run_batch`` plans (the output checked, the bundle loaded, the cases found, those complete from an
earlier run left out), runs (cases loaded and preprocessed by worker processes while the network
runs on the previous one, and written by a thread while the next one runs: see
:mod:`pipelines.batch.loading` and :mod:`pipelines.batch.outputs`) and finalizes (the ranks met,
the reports written, the exit code set). Per case, in ``<output>/<case_id>/``, what the outputs
write and, last, ``record.json``; every file is written under a temporary name and renamed when
complete, so an interrupted run leaves either a complete case or one that the next run redoes. On a
CPU the network leaves a core to each helper while it works (:func:`pipelines.runtime.cpu_runtime`).
Under ``torchrun`` each rank takes every ``world_size``-th case and rank 0 writes the run reports.

One run per output folder: the run holds the folder's lock (:mod:`pipelines.batch.lock`) from before
it looks at the cases until its reports are written; under ``torchrun`` rank 0 holds it for all
ranks (:func:`_lock_output`).

What goes wrong stops as little as it can. A study that cannot be read, preprocessed or segmented
fails alone, with its reason in its record, and so does one whose loading kills the loader process
(a decoder's ``abort()``, a segmentation fault). When the output cannot take more (disk full,
read-only, write permission lost) the run stops with :class:`BatchAbortedError`; on SIGINT or
SIGTERM with :class:`BatchInterrupted`, after ending the loader processes and finishing the case
being written. Either way the finished cases are complete and a rerun resumes. Warnings raised
while a case is loaded or written (third-party messages often name the file) go to that case's
record, never to the log.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.batch.brain import BrainExtraction, brain_extraction
from pipelines.batch.bundle import BundleModel
from pipelines.batch.cases import Case, RemoteQuery, discover_cases, is_remote
from pipelines.batch.errors import BatchAbortedError, BatchInputError
from pipelines.batch.loading import Loading, describe_error
from pipelines.batch.lock import output_lock
from pipelines.batch.notices import CaseWarnings
from pipelines.batch.outputs import default_outputs
from pipelines.batch.priors import prior_folders
from pipelines.batch.records import Records
from pipelines.batch.report import read_records, write_reports
from pipelines.batch.retry import RetryPolicy
from pipelines.io.rules import SeriesRules
from pipelines.io.writers import atomic_path
from pipelines.runtime import CoreShare, cpu_runtime
from pipelines.runtime.distributed import end_process_group

__all__ = ["BatchAbortedError", "BatchInterrupted", "BatchSummary", "run_batch"]

logger = logging.getLogger(__name__)

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}  # fatal on a path in the output only
_PARTIAL = re.compile(r"^\..+\.[0-9a-f]{32}\.part")  # pipelines.io.writers.atomic_path's temporary names


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


@dataclass
class _Plan:
    """What a run will do, decided before any case runs."""

    output: Path
    model: BundleModel
    cases: list[Case]  # all of them (rank 0 reports on all)
    mine: list[Case]  # this rank's
    todo: list[Case]  # this rank's, not complete from an earlier run
    records: Records
    rank: int
    world: int
    joined: bool  # this run created the process group: it ends it


def run_batch(
    bundle: str | os.PathLike,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    workers: int = 1,
    device: str = "cpu",
    tta: bool = False,
    probabilities: bool = False,
    rtstruct: bool = False,
    rules: Mapping | None = None,
    section: str = "test",
    dataset_dir: str | os.PathLike | None = None,
    image_key: str | None = None,
    push: bool | str = False,
    query: RemoteQuery | None = None,
    retry: RetryPolicy | None = None,
    prior: Sequence[str | os.PathLike] = (),
    fail_on_error: bool = False,
    min_free_mb: float = 100.0,
    progress: bool = False,
    overrides: Mapping[str, object] | None = None,
    wait: bool = False,
) -> BatchSummary:
    """Segment every case of ``source`` with the bundle; see the module docstring.

    ``section``, ``dataset_dir``, ``image_key``: for manifest input.

    Args:
        bundle: bundle folder (its ``configs/inference.json``, ``configs/metadata.json`` and
            ``models/model.pt``; what it must define: :mod:`pipelines.batch.bundle`).
        source: folder tree, manifest or DICOMweb URL (see :func:`pipelines.batch.discover_cases`).
        output: output folder (created).
        workers: loading/preprocessing worker processes (0: in the main process, no prefetching).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun, ``cuda`` means the local rank's GPU).
        tta: test-time augmentation, through the bundle's ``tta_inferer``.
        probabilities: also write ``prob.nii.gz`` (the bundle's ``probabilities`` transform).
        rtstruct: also write ``rtstruct.dcm`` (an RT Structure Set, for DICOM input).
        rules: DICOM series rules by name (``{"modality": "CT"}``), over each input's rules from the bundle.
        push: store each case's DICOM outputs (SEG, SR, RTSTRUCT): True, back to the ``source`` server
            (STOW-RS to DICOMweb, C-STORE to a DICOM peer); or to the destination given
            (``http(s)://...`` DICOMweb or ``dicom://AET@host:port``).
        query: for a server ``source``, which studies (``--study-uid``, ``--study-date``; required for a
            DICOM peer) and the calling AE title (also used to push to a DICOM peer).
        retry: how the study query, each fetch and each push are tried again after a server's
            transient failure (default: :class:`~pipelines.batch.retry.RetryPolicy`'s defaults).
        prior: output folders of earlier runs that hold prior studies of the run's patients (the
            run's own finished cases are looked at anyway; :mod:`pipelines.batch.priors`).
        fail_on_error: exit code 1 when any case failed (default: only when all failed).
        min_free_mb: refuse to start with less free space on the output's disk.
        progress: show a progress bar with ETA.
        overrides: bundle overrides (config id -> value, e.g. ``{"channels": ["t2f", "t1c"]}``), set on
            the bundle's inference config as ``python -m monai.bundle run --channels ...`` sets them.
        wait: when another run holds the output folder, wait for it to end instead of refusing to start.

    Raises:
        BatchInputError: unusable input or output, or a bundle that does not meet the contract
            (:class:`~pipelines.batch.errors.BundleContractError`), before any work; also
            :class:`~pipelines.batch.lock.OutputLockedError`, another run holding the output folder.
        BatchAbortedError: the output disk filled up, became read-only or refused permission during the run.
        BatchInterrupted: SIGINT or SIGTERM (when called from the main thread, and the caller left
            their handlers at Python's defaults).
    """
    with _stopped_by_signals(), ExitStack() as held:  # held: the output folder's lock, to the end
        plan = _plan(bundle, source, Path(output), device=device, tta=tta, probabilities=probabilities,
                     rtstruct=rtstruct, rules=rules or {}, section=section, dataset_dir=dataset_dir, image_key=image_key,
                     push=push, query=query or RemoteQuery(), retry=retry or RetryPolicy(), prior=prior,
                     min_free_mb=min_free_mb, overrides=overrides or {}, wait=wait, held=held)
        summary = BatchSummary(cases=len(plan.mine), skipped=len(plan.mine) - len(plan.todo))
        logger.info("rank %d/%d: %d cases, %d complete from an earlier run, %d to do", plan.rank, plan.world,
                    len(plan.mine), summary.skipped, len(plan.todo))
        try:
            _segment_cases(plan, summary, workers=workers, progress=progress)
        except BatchInterrupted as stop:
            stop.summary = summary
            _wind_up(plan.output, plan.todo, summary, plan.rank)
            raise
        _finalize(plan, summary, fail_on_error)
    return summary


def _plan(bundle, source, output: Path, *, device: str, tta: bool, probabilities: bool, rtstruct: bool, rules: Mapping,
          section: str, dataset_dir, image_key, push: bool | str, query: RemoteQuery, retry: RetryPolicy, prior: Sequence,
          min_free_mb: float, overrides: Mapping, wait: bool, held: ExitStack) -> _Plan:
    """Everything decided before the first case: refuses an unusable input, output or bundle, and an
    output folder another run holds (its lock goes on ``held``)."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))  # before NCCL joins: one GPU per rank
    rank, world, joined = _distributed(device)
    if push is True and not is_remote(source):
        raise BatchInputError("--push alone stores DICOM SEGs (and SRs, RTSTRUCTs) back to a DICOMweb or DICOM input; the "
                              "input is not a server: give the destination (--push dicom://AET@host:port or a DICOMweb URL)")
    destination = str(source) if push is True else (str(push) if push else None)
    if destination and not is_remote(destination):
        raise BatchInputError(f"--push: a destination is a DICOMweb URL or dicom://AET@host:port, got {destination!r}")
    _check_output(output, min_free_mb)
    _lock_output(output, rank, world, joined, wait, held)
    priors = prior_folders(prior)
    model = BundleModel(bundle, device=device, tta=tta, probabilities=probabilities, overrides=overrides)
    try:
        model.series_rules = {key: SeriesRules.of(base, **rules) for key, base in model.series_rules.items()}
    except (TypeError, ValueError) as exc:
        raise BatchInputError(f"DICOM series rules: {exc}") from exc
    cases = discover_cases(source, model.series_rules, section=section, dataset_dir=dataset_dir, image_key=image_key,
                           query=query, retry=retry)
    settings = {"tta": tta, "probabilities": probabilities, "rtstruct": rtstruct, "push": destination,
                "series_rules": {key: r.as_dict() for key, r in model.series_rules.items()}}
    run_key = _run_key(model, settings)
    mine = _chronological(_share(cases, rank, world))
    todo = []
    for case in mine:
        _remove_partials(output / case.case_id)
        if not _is_complete(output / case.case_id, case, run_key):
            todo.append(case)
    base = {"model": model.describe(), "settings": {**settings, "device": str(model.device), "rank": rank,
                                                    "world_size": world},
            "run_key": run_key, "software": _software()}
    outputs = default_outputs(model, probabilities, destination, rtstruct, query.calling_aet, output, priors, retry)
    records = Records(output, outputs, base, model.reference_key)
    return _Plan(output, model, cases, mine, todo, records, rank, world, joined)


def _finalize(plan: _Plan, summary: BatchSummary, fail_on_error: bool) -> None:
    """The ranks meet; rank 0 writes the reports; the exit code from the records of the cases."""
    if plan.joined:
        end_process_group()  # waits for every rank
    elif plan.world > 1:
        import torch.distributed as dist

        dist.barrier()
    if plan.rank == 0:
        summary.reports = write_reports(plan.output)
        records = {r["case_id"]: r for r in read_records(plan.output)}
        statuses = [records.get(c.case_id, {}).get("status") for c in plan.cases]
    else:
        mine = {c.case_id for c in plan.mine}
        statuses = [r.get("status") for r in read_records(plan.output) if r.get("case_id") in mine]
    all_failed = statuses and all(s != "ok" for s in statuses)
    summary.exit_code = 1 if all_failed or (fail_on_error and any(s != "ok" for s in statuses)) else 0


def _segment_cases(plan: _Plan, summary: BatchSummary, *, workers: int, progress: bool) -> None:
    """The loop: each case loaded by the worker processes, through the network here, and written by a
    thread while the next one runs. However the loop ends, the loader processes are ended and the
    case being written is finished."""
    from tqdm.auto import tqdm

    model = plan.model
    cores = CoreShare() if model.device.type == "cpu" else None
    loading = Loading(plan.todo, model, plan.output / ".cache", workers, cores)
    warned = CaseWarnings()
    with cpu_runtime(model.network, cores), warned.installed(), \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-writer") as pool:
        pending: Future | None = None
        bar = tqdm(total=len(plan.todo), unit="case", desc="segmenting", disable=not progress, dynamic_ncols=True)
        try:
            with closing(iter(loading)) as items:
                for item in items:
                    record, written = _segment(item, plan, warned)
                    if pending is not None:
                        finished, pending = pending.result(), None
                        _collect(finished, summary)
                    if record is not None:
                        _collect(record, summary)
                    else:
                        pending = pool.submit(_write_safely, plan, cores, warned, *written)
                    bar.update(1)
        finally:
            bar.close()
            try:
                if pending is not None and pending.exception() is None:  # waits for the case being written
                    _collect(pending.result(), summary)
            finally:
                _clear_cache(plan.output / ".cache", plan.todo)


def _segment(item: dict, plan: _Plan, warned: CaseWarnings) -> tuple[dict | None, tuple | None]:
    """A loaded case through the network (main thread): ``(failure record, None)``, or ``(None, what
    :func:`_write_safely` takes after its first three arguments)``."""
    case, caught = item["case"], item.get("warnings", [])
    with warned.into(caught):
        if "error" in item:
            return _record_failure(plan, case, item["error"], caught=caught), None
        try:
            start = time.perf_counter()
            labels, probabilities = plan.model.predict(item["data"])
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory on one huge study
            return _record_failure(plan, case, describe_error(exc), item["timings"], caught), None
    timings = dict(item["timings"], inference_s=time.perf_counter() - start)
    for key, source in item["sources"].items():  # how the preprocessing aligned each input, for the record
        found = getattr(item["data"].get(key), "meta", {}).get("registration")
        if found is not None and hasattr(source, "meta"):
            source.meta["registration"] = found
    views = {key: item["data"][key][0].numpy() for key in plan.model.qc_inputs if key in item["data"]}
    brain = brain_extraction(item["data"], item["sources"][plan.model.reference_key])
    return None, (case, item["sources"], labels, probabilities, timings, caught, views, brain)


def _write_safely(plan: _Plan, cores: CoreShare | None, warned: CaseWarnings, case: Case, sources, labels,
                  probabilities, timings, caught: list[str], views: dict, brain: BrainExtraction | None) -> dict:
    with warned.into(caught):
        try:
            with cores.working() if cores else nullcontext():
                return plan.records.ok(case, sources, labels, probabilities, timings, caught, views, brain)
        except Exception as exc:
            if _fatal(exc, plan.output):
                raise _aborted(plan.output, case, exc) from exc
            return _record_failure(plan, case, describe_error(exc), timings, caught)


def _record_failure(plan: _Plan, case: Case, error: str, timings: Mapping | None = None,
                    caught: list[str] = ()) -> dict:
    try:
        return plan.records.failed(case, error, timings, caught)
    except OSError as exc:
        if not _fatal(exc, plan.output):
            raise
        raise _aborted(plan.output, case, exc) from exc


def _identifiers(case: Case) -> dict:
    """The patient and study identifiers of a case's first DICOM series found on disk, else those
    its manifest entry gives ({} without either)."""
    for source in case.sources.values():
        series = getattr(source, "series", None)
        if series is not None:
            return dict(series.first.identifiers)
    return dict(case.identifiers)


def _share(cases: list[Case], rank: int, world: int) -> list[Case]:
    """This rank's cases: every ``world``-th patient (a case without a known patient counts as one),
    so that all studies of a patient, compared with each other, are segmented by one rank in turn."""
    if world <= 1:
        return list(cases)
    patients = [_identifiers(case).get("patient_id") or f"\x00{index}" for index, case in enumerate(cases)]
    groups = {patient: turn for turn, patient in enumerate(dict.fromkeys(patients))}  # in order of first study
    return [case for case, patient in zip(cases, patients) if groups[patient] % world == rank]


def _chronological(cases: list[Case]) -> list[Case]:
    """Cases in the order of their study dates where known (others first, in their order): a prior
    study of the same run is finished before the later one is compared with it."""
    return sorted(cases, key=lambda case: _identifiers(case).get("study_date") or "")


def _run_key(model: BundleModel, settings: Mapping) -> str:
    text = json.dumps({"bundle": model.bundle_sha256, "weights": model.weights_sha256, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


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


def _lock_output(output: Path, rank: int, world: int, joined: bool, wait: bool, held: ExitStack) -> None:
    """Rank 0 takes the output folder's lock onto ``held`` and hands its outcome to the other ranks,
    which wait for it (the broadcast is the barrier before any rank touches a case) and stop with
    rank 0's refusal, ending the process group together."""
    refusal = None
    if rank == 0:
        try:
            held.enter_context(output_lock(output, wait=wait))
        except BatchInputError as exc:
            if world == 1:
                raise
            refusal = exc
    if world > 1:
        import torch.distributed as dist

        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None:
            if joined:
                end_process_group()
            raise shared[0]


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


def _aborted(output: Path, case: Case, exc: OSError) -> BatchAbortedError:
    """The error that stops the run: the output cannot take more (``exc`` is fatal)."""
    remedy = "restore write permission" if exc.errno in _DENIED_ERRNOS else "make room (or fix the disk)"
    return BatchAbortedError(
        exc.errno, f"cannot write case {case.case_id} to {output}: {exc.strerror}; the cases finished "
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
