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
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.distributed as dist
from tqdm.auto import tqdm

from pipelines.batch.brain import brain_extraction
from pipelines.batch.cases import Case, RemoteQuery
from pipelines.batch.errors import BatchAbortedError, describe_error
from pipelines.batch.loading import Loaded, LoadFailed, Loading
from pipelines.batch.notices import CaseWarnings
from pipelines.batch.outputs import Segmented
from pipelines.batch.plan import Plan, make_plan, remove_partials
from pipelines.batch.remote.retry import RetryPolicy
from pipelines.batch.report import read_records, write_reports
from pipelines.batch.signals import BatchInterrupted, stopped_by_signals
from pipelines.runtime import CoreShare, cpu_runtime
from pipelines.runtime.distributed import end_process_group

__all__ = ["BatchAbortedError", "BatchInterrupted", "BatchSummary", "run_batch"]

logger = logging.getLogger(__name__)

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}  # fatal on a path in the output only


@dataclass
class BatchSummary:
    """What a run did. ``exit_code``: 0, or 1 when every case failed (or any, with ``fail_on_error``)."""

    cases: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    exit_code: int = 0
    reports: tuple[Path, ...] = ()


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
    case_pages: bool = True,
    runtime: str | None = None,
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
        case_pages: write each volume's case page, ``index.html`` (with NiiVue installed).
        runtime: where the network runs on the CPU: ``torch`` or ``openvino``
            (:mod:`pipelines.inference.runtimes`); None: the bundle's ``runtime`` config id, else ``torch``.
        rules: DICOM series rules by name (``{"modality": "CT"}``), over each input's rules from the bundle.
        push: store each case's DICOM outputs (SEG, SR, RTSTRUCT): True, back to the ``source`` server
            (STOW-RS to DICOMweb, C-STORE to a DICOM peer); or to the destination given
            (``http(s)://...`` DICOMweb or ``dicom://AET@host:port``).
        query: for a server ``source``, which studies (``--study-uid``, ``--study-date``; required for a
            DICOM peer) and the calling AE title (also used to push to a DICOM peer).
        retry: how the study query, each fetch and each push are tried again after a server's
            transient failure (default: :class:`~pipelines.batch.remote.retry.RetryPolicy`'s defaults).
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
    with stopped_by_signals(), ExitStack() as held:  # held: the output folder's lock, to the end
        plan = make_plan(bundle, source, Path(output), device=device, tta=tta, probabilities=probabilities,
                     rtstruct=rtstruct, case_pages=case_pages, runtime=runtime, rules=rules or {}, section=section, dataset_dir=dataset_dir, image_key=image_key,
                     push=push, query=query or RemoteQuery(), retry=retry or RetryPolicy(), prior=prior,
                     min_free_mb=min_free_mb, overrides=overrides or {}, wait=wait, held=held)
        summary = BatchSummary(cases=len(plan.mine), skipped=len(plan.mine) - len(plan.todo))
        logger.info("rank %d/%d: %d cases, %d complete from an earlier run, %d to do", plan.rank, plan.world,
                    len(plan.mine), summary.skipped, len(plan.todo))
        try:
            _segment_cases(plan, summary, workers=workers, progress=progress)
        except BatchInterrupted as stop:
            stop.summary = summary
            _wind_up(plan, summary)
            raise
        _finalize(plan, summary, fail_on_error)
    return summary


def _finalize(plan: Plan, summary: BatchSummary, fail_on_error: bool) -> None:
    """The ranks meet; rank 0 writes the reports; the exit code from the records of the cases."""
    if plan.joined:
        end_process_group()  # waits for every rank
    elif plan.world > 1:
        dist.barrier()
    if plan.rank == 0:
        summary.reports = write_reports(plan.output, columns=plan.model.report_columns)
        records = {r["case_id"]: r for r in read_records(plan.output)}
        statuses = [records.get(c.case_id, {}).get("status") for c in plan.cases]
    else:
        mine = {c.case_id for c in plan.mine}
        statuses = [r.get("status") for r in read_records(plan.output) if r.get("case_id") in mine]
    all_failed = statuses and all(s != "ok" for s in statuses)
    summary.exit_code = 1 if all_failed or (fail_on_error and any(s != "ok" for s in statuses)) else 0


def _segment_cases(plan: Plan, summary: BatchSummary, *, workers: int, progress: bool) -> None:
    """The loop: each case loaded by the worker processes, through the network here, and written by a
    thread while the next one runs. However the loop ends, the loader processes are ended and the
    case being written is finished."""
    model = plan.model
    cores = CoreShare() if model.device.type == "cpu" else None
    loading = Loading(plan.todo, model, plan.output / ".cache", workers, cores)
    warned = CaseWarnings()
    with cpu_runtime(model.runner, cores), warned.installed(), \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-writer") as pool:
        pending: Future | None = None
        bar = tqdm(total=len(plan.todo), unit="case", desc="segmenting", disable=not progress, dynamic_ncols=True)
        try:
            with closing(iter(loading)) as items:
                for item in items:
                    record, segmented = _segment(item, plan, warned)
                    if pending is not None:
                        finished, pending = pending.result(), None
                        _collect(finished, summary)
                    if record is not None:
                        _collect(record, summary)
                    else:
                        pending = pool.submit(_write_safely, plan, cores, warned, segmented)
                    bar.update(1)
        finally:
            bar.close()
            try:
                if pending is not None and pending.exception() is None:  # waits for the case being written
                    _collect(pending.result(), summary)
            finally:
                _clear_cache(plan.output / ".cache", plan.todo)


def _segment(item: Loaded | LoadFailed, plan: Plan, warned: CaseWarnings) -> tuple[dict | None, Segmented | None]:
    """A loaded case through the network (main thread): ``(failure record, None)``, or ``(None, the
    case segmented)`` for :func:`_write_safely`."""
    case, caught = item.case, item.warnings
    with warned.into(caught):
        if isinstance(item, LoadFailed):
            return _record_failure(plan, case, item.error, caught=caught), None
        model = plan.model
        try:
            start = time.perf_counter()
            labels, probabilities = model.predict(item.data)
            timings = dict(item.timings, inference_s=time.perf_counter() - start)
            label_map = np.asarray(labels)[0]
            reference = item.sources[model.reference_key]
            if label_map.shape != tuple(reference.shape[1:]):
                raise RuntimeError(f"the prediction's grid {label_map.shape} differs from input "
                                   f"{model.reference_key!r}'s {tuple(reference.shape[1:])}: the bundle's postprocessing "
                                   f"must return the label map on the reference input's grid")
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory on one huge study
            return _record_failure(plan, case, describe_error(exc), item.timings, caught), None
    registration = {key: found for key in item.sources  # how the preprocessing aligned each input
                    if (found := getattr(item.data.get(key), "meta", {}).get("registration")) is not None}
    return None, Segmented(
        case, item.sources, model.reference_key, label_map,
        None if probabilities is None else np.asarray(probabilities, dtype=np.float32),
        views={key: item.data[key][0].numpy() for key in model.input_keys if key in item.data},
        brain=brain_extraction(item.data, reference), registration=registration, timings=timings, warnings=caught,
    )


def _write_safely(plan: Plan, cores: CoreShare | None, warned: CaseWarnings, segmented: Segmented) -> dict:
    with warned.into(segmented.warnings):
        try:
            with cores.working() if cores else nullcontext():
                return plan.records.ok(segmented)
        except Exception as exc:
            if _fatal(exc, plan.output):
                raise _aborted(plan.output, segmented.case, exc) from exc
            return _record_failure(plan, segmented.case, describe_error(exc), segmented.timings, segmented.warnings)


def _record_failure(plan: Plan, case: Case, error: str, timings: Mapping | None = None,
                    caught: list[str] = ()) -> dict:
    try:
        return plan.records.failed(case, error, timings, caught)
    except OSError as exc:
        if not _fatal(exc, plan.output):
            raise
        raise _aborted(plan.output, case, exc) from exc


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


def _wind_up(plan: Plan, summary: BatchSummary) -> None:
    """After a signal stopped the run: no temporary file left (the main thread may have been stopped
    inside a write), and the reports list the cases finished so far."""
    try:
        for case in plan.todo:
            remove_partials(plan.output / case.case_id)
        if plan.rank == 0:
            summary.reports = write_reports(plan.output, columns=plan.model.report_columns)
    except OSError as exc:  # the signal's exit code stands; a rerun removes what is left
        logger.warning("stopped; temporary files or reports could not be written or removed: %s",
                       exc.strerror or exc)


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
