"""The bundles served by a real MONAI Label server (run from .venv-label), on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import psutil
import pydicom
import pytest
import requests
from PIL import Image

from pipelines.batch import run_batch
from tests import servers
from tests.batch.conftest import BUNDLE, DEMO, demo_case
from tests.conftest import REPO
from tests.label.conftest import label_python, label_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEST_CASES = (0, 1, 2)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dice(prediction: np.ndarray, reference: np.ndarray, label: int) -> float:
    a, b = prediction == label, reference == label
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _infer(base: str, model: str, image: str, target) -> nib.Nifti1Image:
    response = requests.post(f"{base}/infer/{model}", params={"image": image, "output": "image"}, timeout=300)
    assert response.status_code == 200, response.text[-2000:]
    target.write_bytes(response.content)
    return nib.load(target)


def _batch_mask(bundle, entry: dict, out, data=DEMO) -> tuple[np.ndarray, dict]:
    """The batch job's mask and record for one demo case (a one-case manifest, so it also scores Dice)."""
    manifest = out.parent / f"{out.name}.json"
    manifest.write_text(json.dumps({"test": [entry]}))
    summary = run_batch(bundle, manifest, out, workers=0, dataset_dir=data, image_key="image", case_pages=False)
    assert summary.done == 1, summary
    (case_dir,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    record = json.loads((case_dir / "record.json").read_text())
    return np.asarray(nib.load(case_dir / "mask.nii.gz").dataobj), record


BRAIN = REPO / "bundles" / "unet3d_brain_tumor"
BRAIN_DEMO = REPO / "demo_brain"


def _brain_case() -> dict:
    entries = json.loads((REPO / "data_manifests" / "demo_brain.json").read_text())["validation"]
    if not (BRAIN_DEMO / "brats").is_dir():
        pytest.skip("demo_brain/ not generated (make demo-brain)")
    return entries[0]


@pytest.fixture(scope="module")
def local_server(tmp_path_factory):
    """The server over a folder of three demo test images (``<case_id>.nii.gz``) and one brain
    tumor case as a 4D NIfTI of its four channels."""
    root = tmp_path_factory.mktemp("label")
    studies = root / "studies"
    studies.mkdir()
    entries = [demo_case("test", i) for i in TEST_CASES]
    for entry in entries:
        shutil.copy(DEMO / entry["image"], studies / f"{entry['case_id']}.nii.gz")
    brain = _brain_case()
    channels = [nib.load(BRAIN_DEMO / path) for path in brain["image"]]
    stacked = np.stack([np.asarray(c.dataobj) for c in channels], axis=-1)
    nib.save(nib.Nifti1Image(stacked, channels[0].affine), studies / f"{brain['case_id']}.nii.gz")
    with label_server(root, str(studies)) as (base, app, log):
        yield base, app, log, entries, brain


def test_info_lists_the_bundles_with_their_labels(local_server):
    base, app, log, entries, brain = local_server
    info = requests.get(f"{base}/info/", timeout=30).json()
    assert info["models"]["unet3d_tumor"]["labels"] == {"tumor": 1, "edema": 2}
    assert info["models"]["unet3d_tumor"]["dimension"] == 3
    assert info["models"]["unet2d_isbi2012"]["labels"] == {"membrane": 0, "cell": 1}
    assert info["models"]["unet2d_isbi2012"]["dimension"] == 2
    assert info["models"]["unet3d_brain_tumor"]["labels"] == {"necrotic core": 1, "edema": 2, "enhancing tumor": 3}
    assert set(info["trainers"]) == {"unet3d_tumor", "unet2d_isbi2012", "unet3d_brain_tumor"}
    listed = set(requests.get(f"{base}/datastore/?output=all", timeout=30).json()["objects"])
    assert listed == {e["case_id"] for e in entries} | {brain["case_id"]}
    # served from copies: training never touches the repository's bundles
    for name in ("unet3d_tumor", "unet2d_isbi2012", "unet3d_brain_tumor"):
        assert (app / "model" / name / "models" / "model.pt").is_file()
    # listening on loopback only
    port = int(base.rsplit(":", 1)[1])
    listening = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}
    assert "dcmqi" not in log.read_text() or "nothing is downloaded" in log.read_text()


def test_infer_matches_the_batch_job(local_server, tmp_path):
    base, app, log, entries, brain = local_server
    entry = entries[0]
    result = _infer(base, "unet3d_tumor", entry["case_id"], tmp_path / "served.nii.gz")
    image = nib.load(DEMO / entry["image"])
    reference = np.asarray(nib.load(DEMO / entry["label"]).dataobj)
    assert result.shape == image.shape and np.allclose(result.affine, image.affine, atol=1e-4)
    assert result.get_data_dtype() == np.uint8
    served = np.asarray(result.dataobj)
    batch, record = _batch_mask(BUNDLE, entry, tmp_path / "batch")
    assert np.mean(served == batch) > 0.999
    for name, label in (("tumor", 1), ("edema", 2)):
        assert _dice(served, reference, label) == pytest.approx(record["dice"][name], abs=0.005)
        assert _dice(served, reference, label) > 0.85


def test_the_brain_bundle_segments_a_four_channel_image_as_the_batch_job_does(local_server, tmp_path):
    """One 4D NIfTI per case (T1, T1c, T2, FLAIR): the served label map equals the batch job's on the
    same case from its BraTS-layout files."""
    base, app, log, entries, brain = local_server
    result = _infer(base, "unet3d_brain_tumor", brain["case_id"], tmp_path / "served.nii.gz")
    t1 = nib.load(BRAIN_DEMO / brain["image"][0])
    assert result.shape == t1.shape and np.allclose(result.affine, t1.affine, atol=1e-4)
    served = np.asarray(result.dataobj)
    batch, record = _batch_mask(BRAIN, brain, tmp_path / "batch", BRAIN_DEMO)
    assert np.mean(served == batch) > 0.999 and set(np.unique(served)) <= {0, 1, 2, 3}
    reference = np.asarray(nib.load(BRAIN_DEMO / brain["label"]).dataobj)
    assert _dice(served > 0, reference > 0, True) == pytest.approx(record["region_scores"]["WT"]["dice"], abs=0.005)


def test_served_on_the_int8_model_as_the_batch_job_runs_it(tmp_path):
    """``label-server --runtime openvino-int8``: the tumor bundle's int8 model serves the label map the
    batch job makes with it; a bundle without an int8 model stops the server at start, named."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (the openvino extra)")
    entry = demo_case("test", 0)
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(DEMO / entry["image"], studies / f"{entry['case_id']}.nii.gz")
    (tmp_path / "refused").mkdir()
    uncalibrated = tmp_path / "bundles" / "unet3d_tumor"  # the tumor bundle before `quantize`
    shutil.copytree(BUNDLE, uncalibrated, ignore=shutil.ignore_patterns("model_int8.*", "eval"))
    with pytest.raises(pytest.fail.Exception, match=r"(?s)unet3d_tumor: no calibrated int8 model.*quantize"):
        with label_server(tmp_path / "refused", str(studies), "--runtime", "openvino-int8",
                          "--bundles-dir", str(uncalibrated.parent), "--bundle", "unet3d_tumor"):
            pass
    with label_server(tmp_path, str(studies), "--runtime", "openvino-int8", "--bundle", "unet3d_tumor") as (base, _, log):
        served = np.asarray(_infer(base, "unet3d_tumor", entry["case_id"], tmp_path / "served.nii.gz").dataobj)
    assert "unet3d_tumor: the network runs on openvino-int8" in log.read_text()
    manifest = tmp_path / "one.json"
    manifest.write_text(json.dumps({"test": [entry]}))
    assert run_batch(BUNDLE, manifest, tmp_path / "batch", workers=0, dataset_dir=DEMO, image_key="image",
                     case_pages=False, runtime="openvino-int8").done == 1
    (case_dir,) = [p for p in (tmp_path / "batch").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
    batch = np.asarray(nib.load(case_dir / "mask.nii.gz").dataobj)
    assert served.any() and np.mean(served == batch) > 0.999


def test_2d_bundle_segments_an_uploaded_em_section(local_server, isbi_dir, tmp_path):
    """The ISBI bundle (valid U-Net, overlap-tile, watershed) on validation section 20, sent with the request."""
    base = local_server[0]
    with open(isbi_dir / "train" / "image" / "20.png", "rb") as image:
        response = requests.post(f"{base}/infer/unet2d_isbi2012", params={"output": "image"},
                                 files={"file": ("20.png", image)}, timeout=300)
    assert response.status_code == 200, response.text[-2000:]
    (tmp_path / "cells.png").write_bytes(response.content)
    cells = np.asarray(Image.open(tmp_path / "cells.png"))
    reference = np.asarray(Image.open(isbi_dir / "train" / "label" / "20.png")) > 127
    assert cells.shape == reference.shape == (512, 512) and set(np.unique(cells)) == {0, 1}
    assert np.mean((cells == 1) == reference) > 0.88  # 0.911 measured


def test_saved_labels_train_and_the_next_inference_uses_the_new_weights(local_server, tmp_path):
    base, app, log, entries, brain = local_server
    shipped = _sha256(BUNDLE / "models" / "model.pt")
    served_weights = app / "model" / "unet3d_tumor" / "models" / "model.pt"
    before = np.asarray(_infer(base, "unet3d_tumor", entries[1]["case_id"], tmp_path / "before.nii.gz").dataobj)
    for entry in entries:
        with open(DEMO / entry["label"], "rb") as label:
            response = requests.put(f"{base}/datastore/label", params={"image": entry["case_id"], "tag": "final"},
                                    files={"label": (f"{entry['case_id']}.nii.gz", label)}, timeout=60)
        assert response.status_code == 200, response.text
    old = _sha256(served_weights)
    response = requests.post(f"{base}/train/unet3d_tumor", params={"run_sync": "true"},
                             json={"max_epochs": 1, "device": "cpu", "multi_gpu": False}, timeout=600)
    assert response.status_code == 200, response.text
    text = log.read_text()
    assert "Epoch[1] Metrics" in text and "Restored all variables from" in text  # fine-tuned from the served weights
    assert _sha256(served_weights) != old
    assert _sha256(BUNDLE / "models" / "model.pt") == shipped
    after = np.asarray(_infer(base, "unet3d_tumor", entries[1]["case_id"], tmp_path / "after.nii.gz").dataobj)
    assert np.any(after != before)
    # exactly what the batch job gives with the retrained weights
    batch, _ = _batch_mask(app / "model" / "unet3d_tumor", entries[1], tmp_path / "batch")
    assert np.mean(after == batch) > 0.999


def test_a_saved_brain_label_trains_the_four_channel_bundle(local_server, tmp_path):
    """An annotator's label on the 4D case (BraTS 2023 values) fine-tunes the brain bundle through the
    server: the stacked image and the label go through the bundle's own preprocessing (regions, the
    label's value check), and the next inference uses the new weights, as the batch job does with them.
    The single-series cases labelled for the tumor bundle in the same datastore are left out of its
    training, each named (they answered 500 when they were fed to the four-channel network)."""
    base, app, log, entries, brain = local_server
    served_weights = app / "model" / "unet3d_brain_tumor" / "models" / "model.pt"
    shipped, old = _sha256(BRAIN / "models" / "model.pt"), _sha256(served_weights)
    before = np.asarray(_infer(base, "unet3d_brain_tumor", brain["case_id"], tmp_path / "before.nii.gz").dataobj)
    with open(BRAIN_DEMO / brain["label"], "rb") as label:
        response = requests.put(f"{base}/datastore/label", params={"image": brain["case_id"], "tag": "final"},
                                files={"label": (f"{brain['case_id']}.nii.gz", label)}, timeout=60)
    assert response.status_code == 200, response.text
    logged = len(log.read_text())
    response = requests.post(f"{base}/train/unet3d_brain_tumor", params={"run_sync": "true"},
                             json={"max_epochs": 1, "device": "cpu", "multi_gpu": False}, timeout=600)
    assert response.status_code == 200, response.text
    text = log.read_text()[logged:]
    assert "Epoch[1] Metrics" in text and "Restored all variables from" in text  # fine-tuned from the served weights
    final = app.parent / "studies" / "labels" / "final"
    tumor_labels = [e["case_id"] for e in entries if (final / f"{e['case_id']}.nii.gz").is_file()]
    if tumor_labels:  # the tumor bundle's training ran first, on the same datastore
        assert f"{len(tumor_labels)} labelled image{'s' * (len(tumor_labels) > 1)} left out of training" in text
        assert all(case_id in text for case_id in tumor_labels)
    assert _sha256(served_weights) != old and _sha256(BRAIN / "models" / "model.pt") == shipped
    after = np.asarray(_infer(base, "unet3d_brain_tumor", brain["case_id"], tmp_path / "after.nii.gz").dataobj)
    assert np.any(after != before) and set(np.unique(after)) <= {0, 1, 2, 3}
    batch, _ = _batch_mask(app / "model" / "unet3d_brain_tumor", brain, tmp_path / "batch", BRAIN_DEMO)
    assert np.mean(after == batch) > 0.999


def test_dicomweb_store_infers_saves_seg_and_trains(tmp_path):
    """Orthanc as the datastore: inference on a series by its UID, the corrected label stored back as a
    DICOM SEG written by dcmqi (the wheel the MONAI Label environment installs; nothing downloaded)
    with the bundle's codes, and a training epoch that reads that SEG back."""
    entry = demo_case("test", 0)
    study = DEMO / entry["dicom"]
    first = pydicom.dcmread(sorted(study.glob("*.dcm"))[0], stop_before_pixels=True)
    series_uid, study_uid = first.SeriesInstanceUID, first.StudyInstanceUID
    (tmp_path / "orthanc").mkdir()
    with servers.orthanc(tmp_path / "orthanc", [study]) as url:
        with label_server(tmp_path, url, "--bundle", "unet3d_tumor") as (base, app, log):
            assert set(requests.get(f"{base}/info/", timeout=30).json()["models"]) == {"unet3d_tumor"}
            result = _infer(base, "unet3d_tumor", series_uid, tmp_path / "served.nii.gz")
            label_info = {"label_info": [{"name": "tumor", "idx": 1}, {"name": "edema", "idx": 2}]}
            with open(tmp_path / "served.nii.gz", "rb") as label:
                response = requests.put(f"{base}/datastore/label", params={"image": series_uid, "tag": "final"},
                                        data={"params": json.dumps(label_info)},
                                        files={"label": ("served.nii.gz", label)}, timeout=120)
            assert response.status_code == 200, response.text[-2000:]
            with requests.get(f"{url}/studies/{study_uid}/series", timeout=30) as listing:
                series = {s["00080060"]["Value"][0]: s["0020000E"]["Value"][0] for s in listing.json()}
            assert sorted(series) == ["MR", "SEG"]  # the SEG sits in the study beside its source
            # coded as the bundle's metadata codes them (MONAI Label alone writes 78961009, spleen)
            with requests.get(f"{url}/studies/{study_uid}/series/{series['SEG']}/metadata", timeout=30) as meta:
                (seg,) = meta.json()
            stored = [(item["00620004"]["Value"][0], item["00620005"]["Value"][0], item["00620008"]["Value"][0],
                       item["00620003"]["Value"][0]["00080100"]["Value"][0],
                       item["0062000F"]["Value"][0]["00080100"]["Value"][0]) for item in seg["00620002"]["Value"]]
            present = sorted(set(np.unique(np.asarray(result.dataobj)).astype(int).tolist()) - {0})
            expected = {1: ("tumor", "108369006"), 2: ("edema", "79654002")}
            assert [(name, kind, category, code) for _, name, kind, category, code in stored] == [
                (expected[v][0], "SEMIAUTOMATIC", "49755003", expected[v][1]) for v in present]
            # a result asked for as DICOM SEG: the model's, coded alike
            response = requests.post(f"{base}/infer/unet3d_tumor", params={"image": series_uid, "output": "dicom_seg"},
                                     data={"params": json.dumps(label_info)}, timeout=300)
            assert response.status_code == 200, response.text[-2000:]
            (tmp_path / "infer_seg.dcm").write_bytes(response.content)
            infer_seg = pydicom.dcmread(tmp_path / "infer_seg.dcm")
            assert "dcmqi" in str(infer_seg.get("SoftwareVersions", "")) + str(infer_seg.get("ManufacturerModelName", ""))
            assert "DICOM SEGs are written by dcmqi's itkimage2segimage" in log.read_text()
            coded = [(s.SegmentLabel, s.SegmentAlgorithmType, s.SegmentedPropertyTypeCodeSequence[0].CodeValue)
                     for s in infer_seg.SegmentSequence]
            assert coded == [(expected[v][0], "AUTOMATIC", expected[v][1]) for v in present]
            weights = app / "model" / "unet3d_tumor" / "models" / "model.pt"
            old = _sha256(weights)
            response = requests.post(f"{base}/train/unet3d_tumor", params={"run_sync": "true"},
                                     json={"max_epochs": 1, "device": "cpu", "multi_gpu": False}, timeout=600)
            assert response.status_code == 200, response.text
            text = log.read_text()
            assert "validating on the training images" in text  # one label: the 20% validation split is empty
            assert "Epoch[1] Metrics" in text and _sha256(weights) != old
    summary = run_batch(BUNDLE, study, tmp_path / "batch", workers=0, case_pages=False)
    assert summary.done == 1
    (case_dir,) = [p for p in (tmp_path / "batch").iterdir() if p.is_dir() and not p.name.startswith(".")]
    batch = nib.load(case_dir / "mask.nii.gz")
    assert result.shape == batch.shape and np.allclose(result.affine, batch.affine, atol=1e-3)
    assert np.mean(np.asarray(result.dataobj) == np.asarray(batch.dataobj)) > 0.999


def test_make_label_server_starts_it_in_the_foreground(tmp_path):
    """The README's command: the Makefile target runs the same launcher from .venv-label."""
    label_python()  # skips without the environment
    studies = tmp_path / "studies"
    studies.mkdir()
    port = servers.free_port()
    log_path = tmp_path / "make.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            ["make", "-s", "-o", ".venv-label/.installed", "label-server", f"STUDIES={studies}", f"PORT={port}",
             f"LABEL_APP={tmp_path / 'app'}", "LABEL_ARGS=--bundle unet2d_isbi2012"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            servers.wait_for(lambda: servers.http_ok(f"http://127.0.0.1:{port}/info/"), 180, "make label-server",
                             process, log_path)
            assert set(requests.get(f"http://127.0.0.1:{port}/info/", timeout=30).json()["models"]) == {"unet2d_isbi2012"}
            assert process.poll() is None  # still serving, in the foreground
        finally:
            servers.stop_server(process)
    assert (tmp_path / "app" / "model" / "unet2d_isbi2012" / "models" / "model.pt").is_file()
