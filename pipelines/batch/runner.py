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
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
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

__all__ = ["BatchAbortedError", "BatchSummary", "run_batch"]

logger = logging.getLogger(__name__)

_OUTPUTS = ("mask.nii.gz", "seg.dcm", "prob.nii.gz", "qc.png", "qc_thumbnail.png")
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_PARTIAL = re.compile(r"^\..+\.[0-9a-f]{32}\.part")  # pipelines.io.writers.atomic_path's temporary names


class BatchAbortedError(OSError):
    """The output cannot be written (disk full, read-only): the run stops; finished cases stay."""


@dataclass
class BatchSummary:
    """What a run did. ``exit_code``: 0, or 1 when every case failed (or any, with ``fail_on_error``)."""

    cases: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    exit_code: int = 0
    reports: tuple[Path, ...] = ()


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
        self.cases = cases
        self.preprocess = model.preprocess
        self.rules = dict(model.series_rules)
        self.cache_dir = cache_dir
        self.cores = cores

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> bytes:
        with self.cores.working() if self.cores else nullcontext():
            # pickled here, by value: torch's worker queue moves tensors to shared memory, which frees
            # memory that numpy views in MONAI's transform trace (e.g. Orientation's affine) still point to
            return pickle.dumps(self._item(index), protocol=pickle.HIGHEST_PROTOCOL)

    def _item(self, index: int) -> dict:
        case = self.cases[index]
        start = time.perf_counter()
        try:
            if case.kind == "error":
                raise ValueError(case.error)
            source = self._load(case)
            loaded = time.perf_counter()
            image = self.preprocess(source)
            timings = {"load_s": loaded - start, "preprocess_s": time.perf_counter() - loaded}
            return {"case": case, "source": source, "image": image, "timings": timings}
        except Exception as exc:  # one bad case never stops the run: recorded as failed
            return {"case": case, "error": _describe(exc)}

    def _load(self, case: Case):
        from pipelines.io import load_series, load_volume

        if case.kind == "dicom":
            return load_series(case.series, case.path)
        if case.kind == "file":
            return load_volume(case.path)
        if case.kind == "dicomweb":
            from pipelines.batch.dicomweb import download_study

            folder = download_study(case.url, case.study_uid, self.cache_dir / case.case_id, self.rules)
            return load_volume(folder, **self.rules)
        raise ValueError(f"unknown case kind {case.kind!r}")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, ValueError | OSError) else f"{type(exc).__name__}: {text}"


def _first(batch):
    return batch


def _fatal(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FATAL_ERRNOS


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

    def failed(self, case: Case, error: str, timings: Mapping | None = None) -> dict:
        case_dir = self.output / case.case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        self._clear(case_dir)
        record = {**self._base(case), "status": "failed", "error": error, "outputs": [],
                  "timings": dict(timings or {}), "finished": _now()}
        self._write_record(case_dir, record)
        # the reason can hold file or folder names, which may name the patient: it goes to the record only
        logger.warning("%s: failed; the reason is in %s", case.case_id, case_dir / "record.json")
        return record

    def ok(self, case: Case, source, labels: torch.Tensor, probs: torch.Tensor | None, timings: dict) -> dict:
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
        BatchAbortedError: the output disk filled up or became read-only during the run.
    """
    from tqdm.auto import tqdm

    output = Path(output)
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(torch.device(device))  # before NCCL joins: one GPU per rank
    rank, world, joined = _distributed(device)
    if push and not is_dicomweb_url(source):
        raise BatchInputError("--push stores DICOM SEGs back to a DICOMweb input; the input is not a URL")
    _check_output(output, min_free_mb)
    model = BundleModel(bundle, device=device, tta=tta)
    model.series_rules = {**model.series_rules, **(rules or {})}
    cases = discover_cases(source, model.series_rules, section=section, dataset_dir=dataset_dir, image_key=image_key)
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
    writer = _Writer(output, model, run_key, {**settings, "device": str(model.device), "rank": rank, "world_size": world},
                     str(source) if push else None)
    cores = CoreShare() if model.device.type == "cpu" else None
    loader = torch.utils.data.DataLoader(
        _CaseLoader(todo, model, output / ".cache", cores if workers else None), batch_size=None, shuffle=False,
        num_workers=workers, collate_fn=_first, prefetch_factor=2 if workers else None, persistent_workers=False,
    )
    serving = cores.serving(model.network) if cores else nullcontext()
    with _long_lived_frozen(), serving, ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-writer") as pool:
        pending: Future | None = None
        bar = tqdm(total=len(todo), unit="case", desc="segmenting", disable=not progress, dynamic_ncols=True)
        try:
            for payload in loader:
                item = pickle.loads(payload)
                case = item["case"]
                if "error" in item:
                    record = _record_failure(writer, case, item["error"])
                else:
                    record = None
                    try:
                        start = time.perf_counter()
                        labels, probs = model.predict(item["image"], probabilities=probabilities)
                        timings = dict(item["timings"], inference_s=time.perf_counter() - start)
                    except Exception as exc:  # noqa: BLE001 - e.g. out of memory on one huge study
                        record = _record_failure(writer, case, _describe(exc), item["timings"])
                if pending is not None:
                    _collect(pending.result(), summary)
                    pending = None
                if record is not None:
                    _collect(record, summary)
                else:
                    pending = pool.submit(_write_safely, writer, cores, case, item["source"], labels, probs, timings)
                bar.update(1)
            if pending is not None:
                _collect(pending.result(), summary)
        finally:
            bar.close()
            _clear_cache(output / ".cache", todo)
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


def _write_safely(writer: _Writer, cores: CoreShare | None, case: Case, source, labels, probs, timings) -> dict:
    try:
        with cores.working() if cores else nullcontext():
            return writer.ok(case, source, labels, probs, timings)
    except Exception as exc:
        if _fatal(exc):
            raise _aborted(writer, case, exc) from exc
        return _record_failure(writer, case, _describe(exc), timings)


def _record_failure(writer: _Writer, case: Case, error: str, timings: Mapping | None = None) -> dict:
    try:
        return writer.failed(case, error, timings)
    except OSError as exc:
        if not _fatal(exc):
            raise
        raise _aborted(writer, case, exc) from exc


def _aborted(writer: _Writer, case: Case, exc: OSError) -> BatchAbortedError:
    """The error that stops the run: the output disk cannot take more (``exc`` is fatal)."""
    return BatchAbortedError(
        exc.errno, f"cannot write case {case.case_id} to {writer.output}: {exc.strerror}; the cases finished "
        f"so far are complete; make room (or fix the disk) and rerun to resume", getattr(exc, "filename", None)
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
