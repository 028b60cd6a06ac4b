"""The 3D tumor bundle: configs, shipped weights, and its commands run the way users run them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import jsonschema
import mlflow
import numpy as np
import pytest
import torch
from monai.bundle.scripts import _get_fake_spatial_shape

from pipelines.demo import write_demo_data
from pipelines.engines import latest_checkpoint
from pipelines.io import load_volume
from pipelines.io.dicom_seg import segments_from_metadata
from pipelines.networks import UNet
from tests.bundles.conftest import (
    BUNDLES,
    assert_bundle_ids,
    assert_bundle_layout,
    bundle_metadata,
    bundle_parser,
    read_metrics,
    run_bundle,
)
from tests.conftest import REPO
from tests.servers import free_port, stop_server, wait_for

BUNDLE = BUNDLES / "unet3d_tumor"
CONFIGS = BUNDLE / "configs"
# a small network and patch: every command finishes in seconds on 2 CPU cores
TINY = ["--features", "[4, 8]", "--patch_size", "[32, 32, 32]", "--cache_workers", "0"]


def metadata() -> dict:
    return bundle_metadata("unet3d_tumor")


def parser(*files: str):
    return bundle_parser("unet3d_tumor", *files)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    """A small demo data set (4 training, 2 validation, 1 test case, with DICOM) and its manifest."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_data(root / "data", root / "manifest.json", split={"training": 4, "validation": 2, "test": 1})
    return root / "data", root / "manifest.json"


def data_args(demo, tmp_path: Path) -> list[str]:
    data, manifest = demo
    return ["--dataset_dir", str(data), "--manifest", str(manifest),
            "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]


def train_command(demo, tmp_path: Path, *extra: str) -> list[str]:
    return ["run", "training", "--meta_file", "configs/metadata.json", "--config_file", "configs/train.json",
            "--logging_file", "configs/logging.conf", *TINY, *data_args(demo, tmp_path), *extra]


def test_bundle_layout():
    assert_bundle_layout(BUNDLE)


def test_metadata_validates_and_codes_the_segments():
    schema = json.loads((BUNDLES / "metadata.schema.json").read_text())
    jsonschema.validate(metadata(), schema)
    segments = segments_from_metadata(metadata())
    channels = metadata()["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert [(s.label, s.name) for s in segments] == [(int(k), v) for k, v in channels.items() if k != "0"]
    for segment in segments:  # SNOMED CT codes, as DICOM SEG requires
        assert segment.category[1] == segment.type[1] == "SCT" and segment.type[0].isdigit()


def test_eval_metrics_meet_the_target():
    metrics = metadata()["eval_metrics"]
    assert metrics["val_dice_tumor"] >= 0.80 and metrics["val_dice_edema"] >= 0.80
    assert metrics["val_mean_dice"] == pytest.approx((metrics["val_dice_tumor"] + metrics["val_dice_edema"]) / 2, abs=0.01)


def test_configs_define_the_ids_monai_label_and_users_need():
    train, inference = parser("train.json"), parser("inference.json")
    assert_bundle_ids(train, inference)
    for key in ("spacing", "patch_size", "modality", "features", "num_classes"):
        assert train.get(key) == inference.get(key), key


def test_network_matches_metadata():
    net = parser("train.json").get_parsed_content("network_def")
    assert isinstance(net, UNet) and net.padding == "same" and net.spatial_dims == 3
    fmt = metadata()["network_data_format"]
    assert net.out_channels == fmt["outputs"]["pred"]["num_channels"] == len(fmt["outputs"]["pred"]["channel_def"])
    for n in (4, 5):
        size = _get_fake_spatial_shape(fmt["inputs"]["image"]["spatial_shape"], n=n)
        assert tuple(net(torch.zeros(1, 1, *size)).shape[2:]) == tuple(size)


@pytest.mark.slow
@pytest.mark.integration
def test_training_tracked_in_mlflow_then_inference_on_dicom(demo, tmp_path):
    run_bundle("unet3d_tumor", *train_command(demo, tmp_path, "--max_epochs", "2", "--val_interval", "1",
                                              "--tracking", "mlflow"))
    weights = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert set(weights) == set(UNet(3, 1, 3, features=(4, 8), norm="instance").state_dict())
    assert sorted(p.name for p in (tmp_path / "models").glob("last_checkpoint_*.pt")) == ["last_checkpoint_8.pt"]

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("unet3d_tumor").experiment_id])
    assert {"train_loss", "val_mean_dice", "val_dice_tumor", "val_dice_edema"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "val_dice_tumor")) == 2
    params = run.data.params
    assert params["learning_rate"] == "0.002" and params["patch_size"] == "[32, 32, 32]"
    assert params["training_cases"] == "4" and "optimizer" in params and "spacing" in params
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "model.pt" in artifacts and any(a.endswith(".png") for a in artifacts)
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts)

    out = tmp_path / "seg"
    run_bundle(
        "unet3d_tumor", "run", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
        "--logging_file", "configs/logging.conf", "--features", "[4, 8]", "--dataset_dir", str(demo[0]),
        "--manifest", str(demo[1]), "--ckpt_path", str(tmp_path / "models" / "model.pt"), "--output_dir", str(out),
    )
    (seg_path,) = out.iterdir()
    assert seg_path.name == "case_006_seg.nii.gz"
    seg, source = load_volume(seg_path), load_volume(demo[0] / "dicom" / "case_006")
    assert seg.shape == source.shape  # back on the DICOM series' own grid
    np.testing.assert_allclose(seg.affine.numpy(), source.affine.numpy(), atol=1e-3)
    assert set(np.unique(seg.numpy())) <= {0, 1, 2}


@pytest.mark.integration
def test_the_inference_config_runs_on_the_int8_model(demo, tmp_path):
    """``--runtime openvino-int8`` on ``python -m monai.bundle run``: the shipped int8 model segments
    the demo study as the float network does; a window it was not calibrated on is refused by name."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (the openvino extra)")
    common = ["run", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
              "--logging_file", "configs/logging.conf", "--dataset_dir", str(demo[0]), "--manifest", str(demo[1])]
    segs = {}
    for runtime in ("torch", "openvino-int8"):
        run_bundle("unet3d_tumor", *common, "--runtime", runtime, "--output_dir", str(tmp_path / runtime))
        (path,) = (tmp_path / runtime).iterdir()
        segs[runtime] = load_volume(path).numpy()
    a, b = segs["torch"] > 0, segs["openvino-int8"] > 0
    assert a.any() and 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.98
    with pytest.raises(pytest.fail.Exception, match=r"calibrated on windows of 64x64x64, the inferer.s are 96x96x96"):
        run_bundle("unet3d_tumor", *common, "--runtime", "openvino-int8", "--patch_size", "[96, 96, 96]",
                   "--output_dir", str(tmp_path / "refused"))


@pytest.mark.slow
@pytest.mark.integration
def test_evaluate_reports_per_label_dice(demo, tmp_path):
    run_bundle("unet3d_tumor", *train_command(demo, tmp_path, "--max_epochs", "1", "--val_interval", "1"))
    run_bundle(
        "unet3d_tumor", "run", "--meta_file", "configs/metadata.json",
        "--config_file", "['configs/train.json','configs/evaluate.json']", "--logging_file", "configs/logging.conf",
        *TINY, *data_args(demo, tmp_path),
    )
    metrics = read_metrics(tmp_path / "eval" / "metrics.csv")
    assert set(metrics) == {"val_mean_dice", "val_dice_tumor", "val_dice_edema"}
    assert metrics["val_mean_dice"] == pytest.approx((metrics["val_dice_tumor"] + metrics["val_dice_edema"]) / 2, abs=1e-6)
    assert len(list((tmp_path / "eval" / "overlays").glob("*.png"))) == 2


@pytest.mark.slow
@pytest.mark.integration
def test_early_stopping_ends_a_run_that_stops_improving(demo, tmp_path):
    """With a learning rate of 0 the validation Dice never improves: patience 1 stops after epoch 2."""
    result = run_bundle("unet3d_tumor", *train_command(
        demo, tmp_path, "--max_epochs", "6", "--val_interval", "1", "--early_stop_patience", "1", "--learning_rate", "0.0"))
    output = result.stdout + result.stderr
    assert "Epoch[2] Complete" in output and "Epoch[3] Complete" not in output
    assert "EarlyStopping: Stop training" in output
    # the last checkpoint keeps the patience counter, so a resumed run stops where this one did
    checkpoint = torch.load(latest_checkpoint(tmp_path / "models"), weights_only=False)
    assert checkpoint["early_stopping"]["counter"] == 1


def bundle_process(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "monai.bundle", *args], cwd=BUNDLE, stdout=handle,
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1", **env))


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_mid_epoch_then_rerun_resumes(demo, tmp_path):
    """Epochs of 4 iterations, a checkpoint every 3: kill -9 once iteration 6 (mid-epoch 2) is saved."""
    args = train_command(demo, tmp_path, "--max_epochs", "4", "--val_interval", "2", "--checkpoint_interval", "3")
    first = bundle_process(args, tmp_path / "first.log")
    checkpoint = tmp_path / "models" / "last_checkpoint_6.pt"
    try:
        wait_for(checkpoint.exists, 240, "the iteration-6 checkpoint", first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    killed_at = max(int(p.stem.split("_")[-1]) for p in (tmp_path / "models").glob("last_checkpoint_*.pt"))
    assert killed_at in (6, 9)  # 9 if the kill raced the next save

    result = run_bundle("unet3d_tumor", *args)
    assert "training from scratch" in (tmp_path / "first.log").read_text()
    output = result.stdout + result.stderr
    assert f"last_checkpoint_{killed_at}.pt: epoch {killed_at // 4}, iteration {killed_at}" in output  # epochs completed
    assert "training from scratch" not in output
    first_step = output.index("train_loss")
    assert output[:first_step].rstrip().endswith(f"Epoch: {killed_at // 4 + 1}/4, Iter: {killed_at % 4 + 1}/4 --")
    assert "Epoch: 1/4" not in output  # no step of epoch 1 repeated
    second = sorted((tmp_path / "models").glob("last_checkpoint_*.pt"))
    assert [p.name for p in second] == ["last_checkpoint_16.pt"]  # 4 epochs x 4 iterations, old ones gone
    state = torch.load(second[0], weights_only=False)
    assert state["trainer"]["iteration"] == 16 and state["trainer"]["max_epochs"] == 4
    assert (tmp_path / "models" / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.integration
def test_resume_log_names_the_checkpoint(demo, tmp_path):
    args = train_command(demo, tmp_path, "--max_epochs", "1", "--checkpoint_interval", "2")
    run_bundle("unet3d_tumor", *args)
    result = run_bundle("unet3d_tumor", *train_command(demo, tmp_path, "--max_epochs", "2", "--checkpoint_interval", "2"))
    assert "resumed from" in result.stdout + result.stderr and "last_checkpoint_4.pt: epoch 1, iteration 4" in result.stdout + result.stderr


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite backend; yields (uri, process)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 120, "the MLflow server", process)
        yield uri, process
    finally:
        stop_server(process)


@pytest.mark.slow
@pytest.mark.integration
def test_tracking_server_receives_the_run(demo, tmp_path, mlflow_server):
    uri, _ = mlflow_server
    run_bundle("unet3d_tumor", *train_command(demo, tmp_path, "--max_epochs", "1", "--val_interval", "1",
                                              "--tracking", "mlflow", "--tracking_uri", uri))
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("unet3d_tumor").experiment_id])
    assert run.info.status == "FINISHED"
    assert {"train_loss", "val_dice_tumor", "val_dice_edema"} <= set(run.data.metrics)
    assert run.data.params["max_epochs"] == "1"
    assert "model.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert (tmp_path / "artifacts").is_dir()  # artifacts went through the server, not to a local folder
    assert not (tmp_path / "eval" / "mlruns.db").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_training_survives_the_tracking_server_stopping(demo, tmp_path, mlflow_server):
    uri, server = mlflow_server
    args = train_command(demo, tmp_path, "--max_epochs", "6", "--val_interval", "2",
                         "--tracking", "mlflow", "--tracking_uri", uri)
    training = bundle_process(args, tmp_path / "train.log")
    client = mlflow.MlflowClient(uri)

    def some_losses_logged() -> bool:
        experiment = client.get_experiment_by_name("unet3d_tumor")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        return bool(runs) and len(client.get_metric_history(runs[0].info.run_id, "train_loss")) >= 2

    try:
        wait_for(some_losses_logged, 240, "the first logged losses", training)
        stop_server(server)
        assert training.wait(timeout=600) == 0
    finally:
        if training.poll() is None:
            training.kill()
    log = (tmp_path / "train.log").read_text()
    assert "training continues without tracking" in log
    assert "Epoch[6] Complete" in log
    assert (tmp_path / "models" / "last_checkpoint_24.pt").is_file() and (tmp_path / "models" / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.integration
def test_torchrun_two_processes_with_gloo(demo, tmp_path):
    logs = tmp_path / "logs"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--log-dir", str(logs), "--tee", "3",
         "-m", "monai.bundle", "run", "training", "--meta_file", "configs/metadata.json",
         "--config_file", "['configs/train.json','configs/multi_gpu_train.json']", "--logging_file", "configs/logging.conf",
         *TINY, *data_args(demo, tmp_path), "--max_epochs", "2", "--val_interval", "1", "--checkpoint_interval", "1",
         "--tracking", "mlflow"],
        cwd=BUNDLE, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rank_logs = {int(p.parent.name): p.read_text() for p in logs.glob("*/attempt_0/*/stdout.log")}
    assert set(rank_logs) == {0, 1}
    for rank, log in rank_logs.items():
        # 4 training cases shared by 2 ranks: 2 iterations per epoch on each
        assert "Epoch: 2/2, Iter: 2/2" in log and "Epoch: 1/2, Iter: 3/" not in log, rank
        assert "val_mean_dice" in log, rank  # both ranks validate their half; the metric is gathered
    assert "saved checkpoint" in rank_logs[0] and "saved checkpoint" not in rank_logs[1]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["last_checkpoint_4.pt", "model.pt"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("unet3d_tumor").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 4  # rank 0's iterations only
    state = torch.load(tmp_path / "models" / "last_checkpoint_4.pt", weights_only=False)
    ddp_free = UNet(3, 1, 3, features=(4, 8), norm="instance").state_dict()
    assert set(state["model"]) == {f"module.{k}" for k in ddp_free}


def test_the_evaluation_runs_on_the_int8_model(demo, tmp_path):
    """``evaluate.json`` takes ``runtime`` too: the shipped weights scored on torch and on their int8
    model, the two means within 0.01 Dice, and the run says which model it used."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (the openvino extra)")
    data, manifest = demo
    dice = {}
    for runtime in ("torch", "openvino-int8"):
        result = run_bundle(
            "unet3d_tumor", "run", "--meta_file", "configs/metadata.json",
            "--config_file", "['configs/train.json','configs/evaluate.json']", "--logging_file", "configs/logging.conf",
            "--dataset_dir", str(data), "--manifest", str(manifest), "--cache_workers", "0", "--runtime", runtime,
            "--output_dir", str(tmp_path / runtime),
        )
        dice[runtime] = read_metrics(tmp_path / runtime / "metrics.csv")["val_mean_dice"]
    assert "unet3d_tumor: the network runs on openvino-int8" in result.stdout and "model_int8.xml" in result.stdout
    assert dice["torch"] > 0.5 and dice["openvino-int8"] == pytest.approx(dice["torch"], abs=0.01), dice


@pytest.mark.slow
@pytest.mark.integration
def test_shipped_weights_reproduce_the_recorded_metrics(tmp_path):
    data, manifest = REPO / "demo_data", REPO / "data_manifests" / "demo_tumor.json"
    if not (data / "nifti").is_dir():
        pytest.skip("demo_data/ not generated (make demo-data)")
    run_bundle(
        "unet3d_tumor", "run", "--meta_file", "configs/metadata.json",
        "--config_file", "['configs/train.json','configs/evaluate.json']", "--logging_file", "configs/logging.conf",
        "--output_dir", str(tmp_path), "--cache_workers", "0",
    )
    measured = read_metrics(tmp_path / "metrics.csv")
    for key, value in metadata()["eval_metrics"].items():
        assert measured[key] == pytest.approx(value, abs=5e-4), key
