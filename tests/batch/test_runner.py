"""The batch job end to end on the demo studies with the shipped tumor weights."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pipelines.batch import BatchAbortedError, BatchInputError, BundleModel, pseudonym, run_batch
from pipelines.batch.viewer import VIEWER_DIR
from pipelines.io import load_volume
from pipelines.io.writers import resample_labels
from tests.batch.conftest import BUNDLE, DEMO, broken_stranger, case_dirs, copy_study, demo_case
from tests.conftest import REPO
from tests.documented import assert_record_documented

pytestmark = pytest.mark.integration


def _cli(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines", "batch", "--bundle", str(BUNDLE), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, **kwargs)


def _manifest(tmp_path: Path, count: int, section: str = "test") -> Path:
    entries = json.loads((REPO / "data_manifests" / "demo_tumor.json").read_text())[section][:count]
    demo_case(section, 0)  # skips without the demo data
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({section: entries}))
    return path


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".part" in p.name]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """Two DICOM studies, a NIfTI file and an unreadable file, run once through the CLI code path."""
    root = tmp_path_factory.mktemp("batch")
    entry_a = copy_study("validation", 3, root / "in" / "site" / "patient_a")  # case_027
    entry_b = copy_study("validation", 7, root / "in" / "b")  # case_031
    nifti = demo_case("validation", 0)
    shutil.copy(DEMO / nifti["image"], root / "in" / "scan.nii.gz")
    (root / "in" / "junk").mkdir()
    broken = root / "in" / "junk" / "x.dcm"
    broken_stranger(root / "in" / "b" / "IM00001.dcm", broken)
    during = []
    predict = BundleModel.predict

    def noting_predict(model, *args, **kwargs):  # the run's state while cases run
        leaves = [m for m in model.network.modules() if not any(m.children())]
        during.append({"frozen": gc.get_freeze_count(), "network": model.network, "switch": sys.getswitchinterval(),
                       "hooked": all(m._forward_pre_hooks for m in leaves)})
        return predict(model, *args, **kwargs)

    switch = sys.getswitchinterval()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BundleModel, "predict", noting_predict)
        summary = run_batch(BUNDLE, root / "in", root / "out", workers=1, case_pages=False)
    return root, summary, {"a": entry_a, "b": entry_b, "nifti": nifti, "during": during, "switch": switch}


def _case_dir(root: Path, study: Path) -> Path:
    uid = pydicom.dcmread(next(study.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    return root / "out" / pseudonym(str(uid))


def test_every_case_gets_outputs_and_a_record(folder_run):
    root, summary, entries = folder_run
    assert (summary.cases, summary.done, len(summary.failed), summary.exit_code) == (4, 3, 1, 0)
    out = root / "out"
    case_a = _case_dir(root, root / "in" / "site" / "patient_a")
    record = json.loads((case_a / "record.json").read_text())
    assert record["status"] == "ok" and record["error"] is None
    assert_record_documented(record)
    source = load_volume(root / "in" / "site" / "patient_a")
    mask = load_volume(case_a / "mask.nii.gz")
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine, atol=1e-4)  # the source grid
    reference = load_volume(DEMO / entries["a"]["label"])
    on_grid = resample_labels(reference.numpy(), reference.affine.numpy(), mask.shape[1:], source.affine.numpy())
    labels = mask[0].numpy()
    tumor = 2 * ((labels == 1) & (on_grid == 1)).sum() / ((labels == 1).sum() + (on_grid == 1).sum())
    assert tumor > 0.9
    voxel_ml = abs(np.linalg.det(source.affine.numpy()[:3, :3])) / 1000
    assert record["volumes_ml"]["tumor"] == pytest.approx((labels == 1).sum() * voxel_ml, abs=1e-3)
    assert record["lesion_count"] >= 1 and 20 < record["largest_lesion"]["diameter_mm"] < 200
    assert record["source"]["series_instance_uid"] == source.meta["series_instance_uid"]
    assert record["model"]["bundle"] == "unet3d_tumor" and len(record["model"]["bundle_sha256"]) == 64
    assert set(record["timings"]) >= {"load_s", "preprocess_s", "inference_s", "write_s", "total_s"}
    assert record["software"]["torch"] and record["geometry_corrections"] == []
    seg = hd.seg.segread(case_a / "seg.dcm")
    assert seg.SeriesInstanceUID != source.meta["series_instance_uid"]
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.meta["series_instance_uid"]
    lesions = [f"lesion {n}" for n in range(1, len(record["lesions"]) + 1)]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["tumor", "edema", *lesions]
    assert record["outputs"] == ["mask.nii.gz", "anatomy.nii.gz", "seg.dcm", "sr.dcm", "qc.png", "qc_thumbnail.png"]
    assert record["settings"]["case_pages"] is False and not (out / VIEWER_DIR).exists()  # none asked for
    # the NIfTI case: no DICOM SEG, no patient to compare with later studies
    nifti = json.loads((out / pseudonym("scan.nii.gz") / "record.json").read_text())
    assert nifti["status"] == "ok" and "seg.dcm" not in nifti["outputs"]
    assert "study" not in nifti and "anatomy.nii.gz" not in nifti["outputs"]


def test_long_lived_objects_skip_the_collector_only_during_the_run(folder_run):
    _, _, entries = folder_run
    frozen = [d["frozen"] for d in entries["during"]]
    assert len(frozen) == 3 and min(frozen) > 100_000
    assert gc.get_freeze_count() == 0


def test_cores_are_shared_with_the_helpers_only_during_the_run(folder_run):
    _, _, entries = folder_run
    assert all(d["hooked"] and d["switch"] <= 0.0002 for d in entries["during"])
    network = entries["during"][0]["network"]
    assert not any(m._forward_pre_hooks for m in network.modules())
    assert sys.getswitchinterval() == entries["switch"]


def test_bad_input_is_recorded_with_its_reason(folder_run):
    root, summary, _ = folder_run
    (failed,) = summary.failed
    record = json.loads((root / "out" / failed / "record.json").read_text())
    assert record["status"] == "failed" and "x.dcm" in record["error"] and record["outputs"] == []
    assert_record_documented(record)
    assert sorted(p.name for p in (root / "out" / failed).iterdir()) == ["record.json"]


def test_reports_list_every_case(folder_run):
    root, summary, _ = folder_run
    rows = (root / "out" / "report.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    html = (root / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "3 ok, 1 failed" in html


def test_no_patient_identifier_in_file_names(folder_run):
    root, _, _ = folder_run
    names = [p.name for p in (root / "out").rglob("*")]
    assert names and not any("DEMO" in n.upper() or "PATIENT" in n.upper() or "scan" in n for n in names)


def test_rerun_skips_complete_cases_and_redoes_changed_ones(folder_run, caplog):
    root, _, _ = folder_run
    out = root / "out"
    masks = {p: p.stat().st_mtime_ns for p in out.glob("*/mask.nii.gz")}
    with caplog.at_level(logging.INFO, logger="pipelines"):
        summary = run_batch(BUNDLE, root / "in", out, workers=0, case_pages=False)
    assert (summary.skipped, summary.done, len(summary.failed)) == (3, 0, 1)  # the failed case is retried
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/mask.nii.gz")} == masks
    logs = caplog.text
    assert "DEMO" not in logs.upper() and "patient_a" not in logs  # ids only, no names or paths
    os.utime(root / "in" / "scan.nii.gz")  # a replaced input is redone
    summary = run_batch(BUNDLE, root / "in", out, workers=0, case_pages=False)
    assert (summary.skipped, summary.done) == (2, 1)
    summary = run_batch(BUNDLE, root / "in", out, workers=0, case_pages=False, probabilities=True)  # other settings: redone
    assert summary.done == 3
    prob = load_volume(out / pseudonym("scan.nii.gz") / "prob.nii.gz")
    assert prob.shape[0] == 3 and np.allclose(prob.sum(0), 1, atol=1e-3)


def test_exit_codes(tmp_path):
    (tmp_path / "in").mkdir()
    slice_file = DEMO / demo_case("test", 0)["dicom"] / "IM00001.dcm"
    broken_stranger(slice_file, tmp_path / "in" / "x.dcm")  # truncated
    result = _cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 1, result.stderr  # every case failed
    assert "1 cases: 0 segmented, 0 already complete, 1 failed" in result.stdout
    # two studies beside it (with one, the stray file would count as part of that study: it could be)
    copy_study("test", 0, tmp_path / "in" / "study")
    copy_study("test", 1, tmp_path / "in" / "other")
    result = _cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--quiet", "--workers", "0")
    assert result.returncode == 0, result.stderr
    result = _cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--quiet", "--fail-on-error")
    assert result.returncode == 1 and "2 already complete, 1 failed" in result.stdout


def test_unusable_output_is_refused_before_work(tmp_path):
    copy_study("test", 0, tmp_path / "in")
    (tmp_path / "file").write_text("x")
    result = _cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "file"), "--quiet")
    assert result.returncode == 2 and "is a file, not a folder" in result.stderr
    result = _cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--min-free-mb", "1e12")
    assert result.returncode == 2 and "less than the" in result.stderr
    with pytest.raises(BatchInputError, match="no such file"):
        run_batch(BUNDLE, tmp_path / "nowhere", tmp_path / "out")


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")


def test_read_only_output_is_refused(tmp_path):
    copy_study("test", 0, tmp_path / "in")
    _mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    try:
        with pytest.raises(BatchInputError, match="is not writable: Read-only file system"):
            run_batch(BUNDLE, tmp_path / "in", tmp_path / "ro" / "out")
    finally:
        subprocess.run(["umount", str(tmp_path / "ro")], check=True)


def _pages(folder: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.iterdir())


def test_disk_full_stops_the_run_and_keeps_finished_cases(tmp_path):
    for index in range(3):
        copy_study("test", index, tmp_path / "in" / f"s{index}")
    run_batch(BUNDLE, tmp_path / "in", tmp_path / "probe", workers=0)  # how much one case writes
    sizes = [_pages(p) for p in case_dirs(tmp_path / "probe")]
    viewer = _pages(tmp_path / "probe" / VIEWER_DIR)  # copied once per run, with the first case page
    _mount_tmpfs(tmp_path / "small", f"size={viewer + max(sizes) + min(sizes) // 2}")  # one case fits, two do not
    try:
        with pytest.raises(BatchAbortedError, match="No space left on device.*rerun to resume"):
            run_batch(BUNDLE, tmp_path / "in", tmp_path / "small" / "out", workers=0, min_free_mb=0)
        records = [json.loads(p.read_text()) for p in (tmp_path / "small" / "out").glob("*/record.json")]
        assert [r["status"] for r in records] == ["ok"]
        case_dir = tmp_path / "small" / "out" / records[0]["case_id"]
        assert all((case_dir / name).stat().st_size > 0 for name in records[0]["outputs"])
        load_volume(case_dir / "mask.nii.gz")
        assert _partials(tmp_path / "small") == []
    finally:
        subprocess.run(["umount", str(tmp_path / "small")], check=True)


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_completes_every_case(tmp_path):
    manifest = _manifest(tmp_path, 4)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipelines", "batch", "--bundle", str(BUNDLE), "--input", str(manifest),
               "--dataset-dir", str(DEMO), "--output", str(out), "--quiet", "--no-case-pages"]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("*/record.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the job and its loader processes, mid-run
    process.wait()
    finished = len(list(out.glob("*/record.json")))
    assert 1 <= finished < 4
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"{4 - finished} segmented, {finished} already complete, 0 failed" in result.stdout
    for case_dir in case_dirs(out):
        record = json.loads((case_dir / "record.json").read_text())
        assert record["status"] == "ok"
        assert sorted(p.name for p in case_dir.iterdir()) == sorted(["record.json", *record["outputs"]])
        assert "index.html" not in record["outputs"] and record["settings"]["case_pages"] is False
        load_volume(case_dir / "mask.nii.gz")  # complete files
        hd.seg.segread(case_dir / "seg.dcm")
    assert _partials(out) == [] and not (out / ".cache").exists()
    assert len(list(out.glob("*/record.json"))) == 4


def test_an_error_inside_a_bundles_transforms_is_described_by_its_cause():
    """MONAI's Compose wraps what a transform raises in "applying transform <object at 0x...>"; the
    record gives the transform's own error."""
    from monai.transforms import Compose, Lambda

    from pipelines.batch.errors import describe_error
    from pipelines.io.errors import InputDataError

    def broken(_):
        raise InputDataError("flair/IM0001.dcm: channel 't2f' cannot be aligned")

    with pytest.raises(RuntimeError, match="applying transform") as caught:
        Compose([Compose([Lambda(broken)])])({"image": 0})
    assert describe_error(caught.value) == "flair/IM0001.dcm: channel 't2f' cannot be aligned"
    assert describe_error(MemoryError("out of memory")) == "MemoryError: out of memory"


def test_a_patients_studies_go_to_one_rank_in_date_order():
    """Under torchrun every rank takes whole patients (studies compared with each other are
    segmented by one rank, in turn); within a rank, studies are taken in date order, so a prior
    study of the same run is finished before the later one is compared with it."""
    from types import SimpleNamespace

    from pipelines.batch.cases import Case
    from pipelines.batch.plan import _chronological, _share
    from pipelines.batch.sources import DicomSeriesSource, ImageFileSource

    def study(case_id: str, patient: str, date: str) -> Case:
        series = SimpleNamespace(first=SimpleNamespace(identifiers={"patient_id": patient, "study_date": date}))
        return Case(case_id, {"image": DicomSeriesSource(series, f"/in/{case_id}")})

    cases = [study("a", "P1", "20260301"), study("b", "P2", "20260101"), study("c", "P1", "20250101"),
             Case("d", {"image": ImageFileSource("/in/d.nii.gz")}), study("e", "P3", "20260102"),
             study("f", "P1", "20260201")]
    shares = [[c.case_id for c in _share(cases, rank, 2)] for rank in range(2)]
    assert shares == [["a", "c", "d", "f"], ["b", "e"]]  # patients P1, P2, (d), P3 dealt in turn
    assert [c.case_id for c in _share(cases, 0, 1)] == list("abcdef")
    assert [c.case_id for c in _chronological(cases)] == ["d", "c", "b", "e", "f", "a"]  # unknown dates first
