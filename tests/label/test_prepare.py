"""The app folder MONAI Label serves: main.py and copies of the bundles."""

from __future__ import annotations

import importlib.util

import pytest

from pipelines.cli import main
from pipelines.label import MAIN_PY, prepare_app, server_command
from tests.conftest import REPO


def _bundle(root, name: str, weights: bytes = b"weights") -> None:
    (root / name / "configs").mkdir(parents=True)
    (root / name / "configs" / "metadata.json").write_text("{}")
    (root / name / "models").mkdir()
    (root / name / "models" / "model.pt").write_bytes(weights)
    (root / name / "models" / "last_checkpoint_8.pt").write_bytes(b"resumable state")
    (root / name / "eval").mkdir()
    (root / name / "eval" / "metrics.csv").write_text("dice\n0.9\n")


def test_copies_every_bundle_without_run_outputs(tmp_path):
    _bundle(tmp_path / "bundles", "a")
    _bundle(tmp_path / "bundles", "b")
    served = prepare_app(tmp_path / "app", tmp_path / "bundles")
    assert [p.name for p in served] == ["a", "b"]
    assert (tmp_path / "app" / "main.py").read_text() == MAIN_PY
    copy = tmp_path / "app" / "model" / "a"
    assert (copy / "models" / "model.pt").read_bytes() == b"weights"
    assert not (copy / "eval").exists() and not (copy / "models" / "last_checkpoint_8.pt").exists()
    assert sorted(p.name for p in (tmp_path / "app" / "model").iterdir()) == ["a", "b"]  # no staging left


def test_existing_copy_keeps_its_retrained_weights_unless_refreshed(tmp_path):
    _bundle(tmp_path / "bundles", "a")
    prepare_app(tmp_path / "app", tmp_path / "bundles", ["a"])
    weights = tmp_path / "app" / "model" / "a" / "models" / "model.pt"
    weights.write_bytes(b"retrained")
    prepare_app(tmp_path / "app", tmp_path / "bundles", ["a"])
    assert weights.read_bytes() == b"retrained"
    prepare_app(tmp_path / "app", tmp_path / "bundles", ["a"], refresh=True)
    assert weights.read_bytes() == b"weights"


def test_unknown_bundles_and_bundles_without_weights_are_refused(tmp_path):
    _bundle(tmp_path / "bundles", "a")
    with pytest.raises(ValueError, match=r"bundles/zz is not a bundle .no configs/metadata.json.; bundles there: \['a'\]"):
        prepare_app(tmp_path / "app", tmp_path / "bundles", ["zz"])
    (tmp_path / "bundles" / "a" / "models" / "model.pt").unlink()
    with pytest.raises(ValueError, match=r"a/models/model.pt: the bundle has no weights to serve"):
        prepare_app(tmp_path / "app", tmp_path / "bundles", ["a"])
    with pytest.raises(ValueError, match="bundles folder .*nowhere does not exist"):
        prepare_app(tmp_path / "app", tmp_path / "nowhere")
    assert not (tmp_path / "app").exists()  # nothing written before the checks


def test_project_bundles_are_servable(tmp_path):
    served = prepare_app(tmp_path / "app", REPO / "bundles")
    assert [p.name for p in served] == ["unet2d_isbi2012", "unet3d_brain_tumor", "unet3d_tumor"]
    command = server_command(tmp_path / "app", "/studies", 8123, [p.name for p in served])
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--conf") + 1 : command.index("--conf") + 3] == [
        "models", "unet2d_isbi2012,unet3d_brain_tumor,unet3d_tumor"]
    assert "runtime" not in command  # each bundle's own `runtime` config id
    assert server_command(tmp_path / "app", "/studies", 8123, ["a"], runtime="openvino-int8")[-3:] == [
        "--conf", "runtime", "openvino-int8"]


def test_cli_errors(tmp_path, capsys):
    assert main(["label-server", "--studies", str(tmp_path / "missing")]) == 2
    assert "--studies must be a folder of images or a DICOMweb URL" in capsys.readouterr().err
    if importlib.util.find_spec("monailabel") is None:  # the project's own environment
        assert main(["label-server", "--studies", str(tmp_path)]) == 2
        assert "`make label-server` creates and uses .venv-label" in capsys.readouterr().err
