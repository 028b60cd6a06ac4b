from __future__ import annotations

import json
import shutil

import jsonschema
import mlflow
import numpy as np
import pytest
import torch
from monai.bundle.scripts import _get_fake_spatial_shape
from PIL import Image
from torch import nn

from pipelines.batch import pseudonym, run_batch
from pipelines.metrics.segmentation_errors import pixel_error
from pipelines.networks import UNet
from pipelines.transforms import RandCoarseElasticd, UNetWeightMapd
from tests.bundles.conftest import BUNDLES, assert_bundle_ids, bundle_metadata, bundle_parser, read_metrics, run_bundle

BUNDLE = BUNDLES / "unet2d_isbi2012"
CONFIGS = BUNDLE / "configs"


def metadata() -> dict:
    return bundle_metadata("unet2d_isbi2012")


def parser(*files: str):
    return bundle_parser("unet2d_isbi2012", *files)


def test_bundle_layout():
    for name in ("metadata.json", "train.json", "inference.json", "evaluate.json", "logging.conf"):
        assert (CONFIGS / name).is_file(), name
    for name in ("docs/README.md", "LICENSE", "models/model.pt"):
        assert (BUNDLE / name).is_file(), name
    assert (BUNDLE / "models" / "model.pt").stat().st_size <= 20 * 2**20


def test_metadata_validates_against_the_schema():
    schema = json.loads((BUNDLES / "metadata.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(metadata(), schema)
    broken = metadata()
    del broken["network_data_format"]["outputs"]["pred"]["channel_def"]
    with pytest.raises(jsonschema.ValidationError, match="channel_def"):
        jsonschema.validate(broken, schema)
    broken = metadata()
    del broken["required_packages_version"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_eval_metrics_are_recorded_and_meet_the_targets():
    metrics = metadata()["eval_metrics"]
    assert metrics["pixel_error"] <= 0.08
    assert metrics["rand_error"] <= 0.10
    assert 0.0 < metrics["membrane_dice"] <= 1.0


def test_configs_define_the_ids_monai_label_and_users_need():
    train, inference = parser("train.json"), parser("inference.json")
    assert_bundle_ids(train, inference)


def test_network_matches_metadata_and_the_paper_recipe():
    p = parser("train.json")
    net = p.get_parsed_content("network_def")
    assert isinstance(net, UNet) and net.padding == "valid" and net.spatial_dims == 2
    fmt = metadata()["network_data_format"]
    assert net.out_channels == fmt["outputs"]["pred"]["num_channels"] == len(fmt["outputs"]["pred"]["channel_def"])
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "membrane", "1": "cell"}
    for n in (1, 2, 7):  # the metadata's shape expressions are valid sizes and give the stated outputs
        size = _get_fake_spatial_shape(fmt["inputs"]["image"]["spatial_shape"], n=n)
        assert net.output_shape(size) == _get_fake_spatial_shape(fmt["outputs"]["pred"]["spatial_shape"], n=n)
    patch, label = p.get_parsed_content("patch_size"), p.get_parsed_content("label_size")
    assert tuple(label) == net.output_shape(patch)
    transforms = p.get_parsed_content("train#preprocessing").transforms
    weight_map = next(t for t in transforms if isinstance(t, UNetWeightMapd))
    assert weight_map.weight_map.kwargs["w0"] == 10.0 and weight_map.weight_map.kwargs["sigma"] == 5.0
    elastic = next(t for t in transforms if isinstance(t, RandCoarseElasticd))
    assert elastic.elastic.grid_size == 3 and elastic.elastic.sigma == 10.0


class ThresholdOracle(nn.Module):
    """A valid 'network' whose logits make argmax = 1 (cell) exactly where the image is darker than 0.5."""

    downsample_factor = 4

    def output_shape(self, shape):
        return tuple(s - 4 for s in shape)

    def valid_input_shape(self, shape):
        return tuple(s + 4 for s in shape)

    def forward(self, x):
        centre = x[..., 2:-2, 2:-2]
        return torch.cat([centre - 0.5, 0.5 - centre], dim=1) * 10


def test_inference_writes_pngs_in_the_input_orientation(isbi_dir, tmp_path):
    """The written segmentation must line up with the input PNG pixel for pixel (not transposed)."""
    p = parser("inference.json")
    p["dataset_dir"] = str(isbi_dir / "test")
    p["datalist"] = [str(isbi_dir / "test" / "3.png")]
    p["output_dir"] = str(tmp_path)
    p["network_def"] = ThresholdOracle()
    p["handlers"] = []
    p.get_parsed_content("evaluator").run()
    image = np.asarray(Image.open(isbi_dir / "test" / "3.png")).astype(float) / 255
    seg = np.asarray(Image.open(tmp_path / "3_seg.png"))
    prob = np.asarray(Image.open(tmp_path / "3_membrane_prob.png"))
    assert seg.shape == image.shape == prob.shape and seg.dtype == np.uint8
    # the membrane probability is a pixel-wise function of the image: it must line up exactly
    expected_prob = 1 / (1 + np.exp(-20 * (image - 0.5)))  # softmax of the oracle's two logits
    assert np.abs(prob.astype(float) - np.floor(255 * expected_prob)).max() <= 1
    # the segmentation: membrane (0) where the image is bright; cell (255) where it is dark, but for
    # the one-pixel watershed lines that close cells
    assert set(np.unique(seg)) <= {0, 255}
    assert (seg[image > 0.6] == 0).all()
    assert (seg[image < 0.4] == 255).mean() > 0.9


def test_train_and_inference_post_process_alike():
    train, inference = parser("train.json"), parser("inference.json")
    for key in ("membrane_threshold", "seed_threshold", "min_seed_size", "smoothing_sigma", "features"):
        assert train.get(key) == inference.get(key), key
    evaluate = parser("train.json", "evaluate.json")
    assert evaluate.get("validate#inferer")["_target_"] == inference.get("inferer")["_target_"] == "pipelines.inference.TTAInferer"


@pytest.mark.slow
@pytest.mark.integration
def test_training_and_inference_commands(isbi_dir, tmp_path):
    run_bundle(
        "unet2d_isbi2012", "run", "training",
        "--meta_file", "configs/metadata.json", "--config_file", "configs/train.json",
        "--logging_file", "configs/logging.conf", "--tracking", "mlflow",
        "--epoch_length", "2", "--max_epochs", "1", "--num_workers", "0",
        "--dataset_dir", str(isbi_dir), "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"),
    )
    weights = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert set(weights) == set(UNet(2, 1, 2, features=(16, 32, 64, 128, 256)).state_dict())
    state = torch.load(tmp_path / "models" / "last_checkpoint_2.pt", weights_only=False)  # resumable
    assert state["trainer"]["iteration"] == 2 and {"model", "optimizer", "lr_scheduler"} <= set(state)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("unet2d_isbi2012")
    (run,) = client.search_runs([experiment.experiment_id])
    assert {"train_loss", "val_rand_error", "val_pixel_error", "val_membrane_dice"} <= set(run.data.metrics)

    out = tmp_path / "seg"
    run_bundle(
        "unet2d_isbi2012", "run",
        "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
        "--logging_file", "configs/logging.conf", "--ckpt_path", str(tmp_path / "models" / "model.pt"),
        "--datalist", f"['{isbi_dir / 'test' / '0.png'}', '{isbi_dir / 'test' / '29.png'}']",
        "--output_dir", str(out),
    )
    assert sorted(p.name for p in out.iterdir()) == ["0_membrane_prob.png", "0_seg.png", "29_membrane_prob.png", "29_seg.png"]
    seg = np.asarray(Image.open(out / "0_seg.png"))
    assert seg.shape == (512, 512) and set(np.unique(seg)) <= {0, 255}


@pytest.mark.integration
def test_the_int8_model_keeps_the_held_out_pixel_error(isbi_dir, tmp_path):
    """``--runtime openvino-int8`` on the batch job: a held-out section (21) segmented by the shipped
    int8 model, whose pixel error against the labels is within 0.002 of the float network's; the
    record names the model. The bundle's own inference config on that runtime gives the same cells."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (the openvino extra)")
    (tmp_path / "in").mkdir()
    shutil.copy(isbi_dir / "train" / "image" / "21.png", tmp_path / "in" / "21.png")
    label = np.asarray(Image.open(isbi_dir / "train" / "label" / "21.png")) > 0  # cells 255, membrane 0
    errors = {}
    for runtime in ("torch", "openvino-int8"):
        summary = run_batch(BUNDLE, tmp_path / "in", tmp_path / runtime, workers=0, case_pages=False, runtime=runtime)
        assert summary.done == 1
        case_dir = tmp_path / runtime / pseudonym("21.png")
        errors[runtime] = pixel_error(np.asarray(Image.open(case_dir / "mask.png")) == 1, label)
    record = json.loads((case_dir / "record.json").read_text())
    assert record["settings"]["runtime"].startswith("openvino-int8") and record["model"]["int8_model"] == "model_int8.xml"
    assert errors["torch"] < 0.1 and abs(errors["openvino-int8"] - errors["torch"]) <= 0.002, errors
    result = run_bundle("unet2d_isbi2012", "run", "--meta_file", "configs/metadata.json", "--config_file",
                        "configs/inference.json", "--logging_file", "configs/logging.conf", "--runtime", "openvino-int8",
                        "--dataset_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "bundle"))
    assert "unet2d_isbi2012: the network runs on openvino-int8" in result.stdout
    theirs = np.asarray(Image.open(tmp_path / "bundle" / "21_seg.png")) > 0
    assert np.mean(theirs != (np.asarray(Image.open(case_dir / "mask.png")) == 1)) < 1e-3


@pytest.mark.slow
@pytest.mark.integration
def test_shipped_weights_reproduce_the_recorded_metrics(isbi_dir, tmp_path):
    run_bundle(
        "unet2d_isbi2012", "run",
        "--meta_file", "configs/metadata.json", "--config_file", "['configs/train.json','configs/evaluate.json']",
        "--logging_file", "configs/logging.conf", "--dataset_dir", str(isbi_dir), "--output_dir", str(tmp_path),
    )
    measured = read_metrics(tmp_path / "metrics.csv")
    recorded = metadata()["eval_metrics"]
    assert measured["val_pixel_error"] == pytest.approx(recorded["pixel_error"], abs=5e-4)
    assert measured["val_rand_error"] == pytest.approx(recorded["rand_error"], abs=5e-4)
    assert measured["val_membrane_dice"] == pytest.approx(recorded["membrane_dice"], abs=5e-4)
    assert measured["val_pixel_error"] <= 0.08 and measured["val_rand_error"] <= 0.10


@pytest.mark.slow
@pytest.mark.integration
def test_tuning_config_runs(isbi_dir, tmp_path):
    p = parser("train.json", "evaluate.json", "tune.json")
    p["dataset_dir"] = str(isbi_dir)
    p["output_dir"] = str(tmp_path)
    p["train_datalist"] = p.get_parsed_content("train_datalist")[:2]
    p["tune_grid"] = {"threshold": [0.5, 0.8], "seed_threshold": [0.2], "min_seed_size": [20], "sigma": [1.0]}
    p["validate#inferer#mode"] = "mirror"
    p.get_parsed_content("run")
    rows = (tmp_path / "tuning.csv").read_text().splitlines()
    assert rows[0].split(",") == ["min_seed_size", "seed_threshold", "sigma", "threshold", "pixel_error", "rand_error"]
    assert len(rows) == 3
