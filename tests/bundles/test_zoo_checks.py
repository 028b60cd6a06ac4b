"""The MONAI model zoo's checks, on every bundle in ``bundles/`` (a new bundle gets them too).

As the zoo's CI (``ci/verify_bundle.py``) and pre-commit hooks run them: ``verify_metadata``,
``verify_net_in_out``, ``ckpt_export`` to TorchScript (loaded back, equal to the eager network),
``onnx_export`` (onnxruntime equal to the eager network), ``pretty-format-json --no-sort-keys
--indent=4``, end-of-file, trailing-whitespace and line-ending hooks, and ``large_files.yml`` for
every file over 1 MB.
"""

from __future__ import annotations

import collections
import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml
from monai.bundle import (
    ConfigParser,
    ckpt_export,
    download_large_files,
    onnx_export,
    verify_metadata,
    verify_net_in_out,
)
from monai.bundle.scripts import _get_fake_spatial_shape

from tests.bundles.conftest import BUNDLES

NAMES = sorted(path.parent.parent.name for path in BUNDLES.glob("*/configs/metadata.json"))
LARGE = 1024 * 1024  # bytes: the zoo's check-added-large-files --maxkb=1024


def _bundle_files(bundle):
    """The bundle's files in the repository (git's list: not what a user's run left beside them)."""
    root = BUNDLES / bundle
    listed = subprocess.run(["git", "ls-files", "-z", "--", "."], cwd=root, capture_output=True, check=False)
    if listed.returncode == 0 and listed.stdout:
        return [root / name for name in sorted(listed.stdout.decode().split("\0")) if name and (root / name).is_file()]
    return [p for p in sorted(root.rglob("*")) if p.is_file()]


def _text_files(bundle):
    return [p for p in _bundle_files(bundle) if p.suffix not in (".pt", ".ts", ".onnx", ".bin")]


def test_every_bundle_is_checked():
    assert NAMES == ["unet2d_isbi2012", "unet3d_brain_tumor", "unet3d_tumor"]


@pytest.mark.parametrize("bundle", NAMES)
def test_files_pass_the_zoo_formatting_hooks(bundle):
    for path in _text_files(bundle):
        raw = path.read_bytes()
        text = raw.decode()
        assert b"\r" not in raw, f"{path}: CR line endings"
        assert text.endswith("\n") and not text.endswith("\n\n"), f"{path}: must end with one newline"
        assert all(line == line.rstrip() for line in text.splitlines()), f"{path}: trailing whitespace"
        if path.suffix == ".json":  # pretty-format-json --autofix --no-sort-keys --indent=4
            loaded = json.loads(text, object_pairs_hook=collections.OrderedDict)
            assert text == json.dumps(loaded, indent=4, ensure_ascii=True, separators=(",", ": ")) + "\n", path


@pytest.mark.parametrize("bundle", NAMES)
def test_large_files_are_listed_with_their_sha256(bundle, monkeypatch):
    root = BUNDLES / bundle
    listed = {entry["path"]: entry for entry in yaml.safe_load((root / "large_files.yml").read_text())["large_files"]}
    large = {str(p.relative_to(root)) for p in _bundle_files(bundle) if p.stat().st_size > LARGE}
    assert large and set(listed) == large
    for name, entry in listed.items():
        assert entry["hash_type"] == "sha256"
        assert entry["hash_val"] == hashlib.sha256((root / name).read_bytes()).hexdigest(), name
    monkeypatch.chdir(root)
    download_large_files(bundle_path=".")  # checks the hashes; the files are here, nothing is fetched


def _eager(bundle):
    parser = ConfigParser()
    parser.read_config("configs/inference.json")
    parser.read_meta("configs/metadata.json")
    parser["bundle_root"] = "."
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load("models/model.pt", map_location="cpu", weights_only=True))
    image = parser["_meta_"]["network_data_format"]["inputs"]["image"]
    shape = [1, image["num_channels"], *_get_fake_spatial_shape(image["spatial_shape"], n=1)]
    return net.eval(), torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bundle", NAMES)
def test_zoo_commands_verify_and_export(bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLES / bundle)
    configs = {"meta_file": "configs/metadata.json", "config_file": "configs/inference.json"}
    verify_metadata(meta_file=configs["meta_file"], filepath=str(BUNDLES / "metadata.schema.json"))
    verify_net_in_out(net_id="network_def", device="cpu", **configs)
    net, x = _eager(bundle)
    with torch.no_grad():
        expected = net(x)

    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file="models/model.pt", **configs)
    scripted = torch.jit.load(str(tmp_path / "model.ts"), map_location="cpu").eval()
    with torch.no_grad():
        assert torch.allclose(scripted(x), expected, atol=1e-5)

    ort = pytest.importorskip("onnxruntime")
    onnx_export(net_id="network_def", filepath=str(tmp_path / "model.onnx"), ckpt_file="models/model.pt",
                use_trace=True, input_shape=list(x.shape), **configs)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.allclose(result, expected.numpy(), atol=1e-4)


@pytest.mark.parametrize("bundle", NAMES)
def test_a_bundle_copied_elsewhere_names_the_data_ids_to_pass(bundle, tmp_path, monkeypatch):
    shutil.copytree(BUNDLES / bundle / "configs", tmp_path / bundle / "configs")
    monkeypatch.delenv("UNET_SHARED_DATA", raising=False)
    for config in ("train.json", "inference.json"):
        parser = ConfigParser()
        parser.read_config(str(tmp_path / bundle / "configs" / config))
        parser.read_meta(str(tmp_path / bundle / "configs" / "metadata.json"))
        parser["bundle_root"] = str(tmp_path / bundle)
        for config_id in ("dataset_dir", "manifest"):
            if config_id in parser:
                with pytest.raises(RuntimeError, match="Failed to evaluate ConfigExpression") as raised:
                    parser.get_parsed_content(config_id)
                cause = raised.value.__cause__  # what the user reads under MONAI's wrapper
                assert isinstance(cause, FileNotFoundError) and f"pass --{config_id} <path>" in str(cause), cause
