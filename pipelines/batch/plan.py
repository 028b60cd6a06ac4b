"""What a batch run will do, decided before the first case: the output checked and locked, the
bundle loaded, the input's server and the push destination parsed, the cases found and shared among
``torchrun`` ranks, those complete from an earlier run left out."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import highdicom
import nibabel
import numpy as np
import pydicom
import torch
import torch.distributed as dist

from pipelines import __version__
from pipelines.batch.bundle import BundleModel
from pipelines.batch.cases import Case, RemoteQuery
from pipelines.batch.discovery import discover_cases
from pipelines.batch.errors import BatchInputError
from pipelines.batch.lock import output_lock
from pipelines.batch.outputs import default_outputs
from pipelines.batch.priors import prior_folders
from pipelines.batch.records import Records
from pipelines.batch.remote.endpoint import Endpoint
from pipelines.batch.remote.retry import RetryPolicy
from pipelines.io.rules import SeriesRules
from pipelines.io.writers import atomic_path
from pipelines.runtime.distributed import end_process_group

__all__ = ["Plan", "make_plan", "remove_partials"]

_PARTIAL = re.compile(r"^\..+\.[0-9a-f]{32}\.part")  # pipelines.io.writers.atomic_path's temporary names


@dataclass
class Plan:
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


def make_plan(bundle, source, output: Path, *, device: str, tta: bool, probabilities: bool, rtstruct: bool,
              case_pages: bool, runtime: str | None, rules: Mapping,
          section: str, dataset_dir, image_key, push: bool | str, query: RemoteQuery, retry: RetryPolicy, prior: Sequence,
          min_free_mb: float, overrides: Mapping, wait: bool, held: ExitStack) -> Plan:
    """Everything decided before the first case: refuses an unusable input, output or bundle, and an
    output folder another run holds (its lock goes on ``held``)."""
    from pipelines.inference.runtimes import runtime_name  # pipelines.inference imports MONAI: see bundle.py

    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))  # before NCCL joins: one GPU per rank
    rank, world, joined = _distributed(device)
    server, destination = _endpoints(source, push)
    _check_output(output, min_free_mb)
    _lock_output(output, rank, world, joined, wait, held)
    priors = prior_folders(prior)
    model = BundleModel(bundle, device=device, tta=tta, probabilities=probabilities, overrides=overrides, runtime=runtime)
    try:
        model.series_rules = {key: SeriesRules.of(base, **rules) for key, base in model.series_rules.items()}
    except (TypeError, ValueError) as exc:
        raise BatchInputError(f"DICOM series rules: {exc}") from exc
    cases = discover_cases(server or source, model.series_rules, section=section, dataset_dir=dataset_dir, image_key=image_key,
                           query=query, retry=retry)
    settings = {"tta": tta, "probabilities": probabilities, "rtstruct": rtstruct, "case_pages": case_pages,
                "runtime": runtime_name(model.runtime),
                "push": destination.url if destination else None,
                "series_rules": {key: r.as_dict() for key, r in model.series_rules.items()}}
    run_key = _run_key(model, settings)
    mine = _chronological(_share(cases, rank, world))
    todo = []
    for case in mine:
        remove_partials(output / case.case_id)
        if not _is_complete(output / case.case_id, case, run_key):
            todo.append(case)
    base = {"model": model.describe(), "settings": {**settings, "device": str(model.device), "rank": rank,
                                                    "world_size": world},
            "run_key": run_key, "software": _software()}
    outputs = default_outputs(model, probabilities, destination, rtstruct, query.calling_aet, output, priors, retry,
                              case_pages)
    records = Records(output, outputs, base, model.reference_key)
    return Plan(output, model, cases, mine, todo, records, rank, world, joined)


def _endpoints(source, push: bool | str) -> tuple[Endpoint | None, Endpoint | None]:
    """The input's server (None for a path) and where ``--push`` stores (None without it), each parsed once."""
    try:
        server = Endpoint.parse(source)
        destination = server if push is True else (Endpoint.parse(push) if push else None)
    except ValueError as exc:  # a dicom:// address that is not dicom://AET@host:port
        raise BatchInputError(str(exc)) from exc
    if push is True and server is None:
        raise BatchInputError("--push alone stores DICOM SEGs (and SRs, RTSTRUCTs) back to a DICOMweb or DICOM input; the "
                              "input is not a server: give the destination (--push dicom://AET@host:port or a DICOMweb URL)")
    if push and push is not True and destination is None:
        raise BatchInputError(f"--push: a destination is a DICOMweb URL or dicom://AET@host:port, got {str(push)!r}")
    return server, destination


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
    import monai  # MONAI imports Ignite: see pipelines.batch.bundle

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


def remove_partials(case_dir: Path) -> None:
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
