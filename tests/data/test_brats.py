"""Manifests of a BraTS download in its 2023 and 2021 folder layouts."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pipelines.cli import main
from pipelines.data import (
    build_brats_manifest,
    check_manifest,
    load_manifest,
    split_manifest,
    write_manifest,
)
from pipelines.data.brats import detect_layout
from pipelines.io import InputDataError

AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS files: 1 mm, LPS-like axes as distributed
FILES_2023 = {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f", "seg": "seg"}
FILES_2021 = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}


def _case(folder, case_id, names, joiner, shape=(6, 7, 5), skip=(), seed=0):
    case_dir = folder / case_id
    case_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for channel, name in names.items():
        if channel in skip:
            continue
        data = rng.integers(0, 4, shape).astype(np.uint8) if channel == "seg" else rng.random(shape, np.float32)
        nib.save(nib.Nifti1Image(data, AFFINE), case_dir / f"{case_id}{joiner}{name}.nii.gz")
    return case_dir


@pytest.fixture
def brats2023(tmp_path):
    root = tmp_path / "BraTS2023"
    _case(root, "BraTS-GLI-00001-000", FILES_2023, "-", seed=1)
    _case(root, "BraTS-GLI-00001-001", FILES_2023, "-", seed=2)  # the same patient, a later time point
    _case(root, "BraTS-GLI-00002-000", FILES_2023, "-", seed=3)
    _case(root, "BraTS-GLI-00003-000", FILES_2023, "-", skip=("seg",), seed=4)  # validation data: no labels
    return root


def test_2023_layout_gives_channel_lists_in_order(brats2023, tmp_path):
    manifest, problems = build_brats_manifest(brats2023)
    assert problems == []
    cases = {c["case_id"]: c for c in manifest["training"]}
    assert sorted(cases) == ["BraTS-GLI-00001-000", "BraTS-GLI-00001-001", "BraTS-GLI-00002-000",
                             "BraTS-GLI-00003-000"]
    first = cases["BraTS-GLI-00001-000"]
    assert first["image"] == [f"BraTS-GLI-00001-000/BraTS-GLI-00001-000-{c}.nii.gz" for c in ("t1n", "t1c", "t2w", "t2f")]
    assert first["label"] == "BraTS-GLI-00001-000/BraTS-GLI-00001-000-seg.nii.gz"
    assert (first["channels"], first["convention"], first["shape"]) == (["t1n", "t1c", "t2w", "t2f"], "brats2023",
                                                                              [6, 7, 5])
    assert cases["BraTS-GLI-00001-001"]["patient"] == first["patient"] == "BraTS-GLI-00001"
    assert "label" not in cases["BraTS-GLI-00003-000"]
    path = write_manifest(manifest, tmp_path / "m.json")  # the schema takes channel lists
    entry = load_manifest(path, "training", brats2023)[0]
    assert entry["image"] == [str(brats2023 / p) for p in first["image"]]
    report = check_manifest(path, brats2023)
    assert report.ok, report.problems
    for fold in (0, 1):  # time points of one patient never straddle training and validation
        split = split_manifest(manifest, folds=2, seed=0, validation_fold=fold)
        assert len({c["patient"] for c in split["training"]} & {c["patient"] for c in split["validation"]}) == 0


def test_channels_pick_a_subset_in_the_order_given(brats2023):
    manifest, _ = build_brats_manifest(brats2023, channels=["t2f", "t1c"])
    assert [p.rsplit("-", 1)[1] for p in manifest["training"][0]["image"]] == ["t2f.nii.gz", "t1c.nii.gz"]
    with pytest.raises(ValueError, match="`channels` must be distinct names"):
        build_brats_manifest(brats2023, channels=["flair"])


def test_2021_layout_is_recognised_and_its_names_mapped(tmp_path):
    root = tmp_path / "BraTS2021_Training_Data"
    _case(root, "BraTS2021_00000", FILES_2021, "_")
    _case(root, "BraTS2021_00002", FILES_2021, "_", seed=5)
    assert detect_layout(root).name == "brats2021"
    manifest, problems = build_brats_manifest(root, channels=["t1c", "t2f"])
    assert problems == []
    first = manifest["training"][0]
    assert first["image"] == ["BraTS2021_00000/BraTS2021_00000_t1ce.nii.gz", "BraTS2021_00000/BraTS2021_00000_flair.nii.gz"]
    assert first["convention"] == "brats2021" and first["patient"] == "BraTS2021_00000"


def test_broken_cases_are_left_out_with_a_reason(brats2023, tmp_path):
    _case(brats2023, "BraTS-GLI-00004-000", FILES_2023, "-", skip=("t1c",))
    moved = _case(brats2023, "BraTS-GLI-00005-000", FILES_2023, "-")
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 4), np.float32), AFFINE), moved / "BraTS-GLI-00005-000-t2f.nii.gz")
    broken = _case(brats2023, "BraTS-GLI-00006-000", FILES_2023, "-")
    (broken / "BraTS-GLI-00006-000-t2w.nii.gz").write_bytes(b"not a nifti")
    (brats2023 / "notes").mkdir()
    manifest, problems = build_brats_manifest(brats2023)
    assert len(manifest["training"]) == 4 and len(problems) == 4
    text = "\n".join(problems)
    assert "BraTS-GLI-00004-000: no t1c file (BraTS-GLI-00004-000-t1c.nii.gz)" in text
    assert "BraTS-GLI-00005-000-t2f.nii.gz: grid (6, 7, 4) differs" in text
    assert "BraTS-GLI-00006-000-t2w.nii.gz: not a readable NIfTI file" in text
    assert "notes: not a brats2023 case folder name" in text
    with pytest.raises(InputDataError, match="no BraTS case folders"):
        detect_layout(tmp_path / "BraTS2023" / "notes")


def test_check_finds_a_changed_channel_and_a_channel_off_the_grid(brats2023, tmp_path):
    manifest, _ = build_brats_manifest(brats2023)
    path = write_manifest(manifest, tmp_path / "m.json")
    t2w = brats2023 / "BraTS-GLI-00002-000" / "BraTS-GLI-00002-000-t2w.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 5), np.float32), AFFINE + np.diag([0, 0, 0.5, 0])), t2w)
    problems = check_manifest(path, brats2023).problems
    assert any("changed since the manifest was built" in p for p in problems)
    assert any("image BraTS-GLI-00002-000/BraTS-GLI-00002-000-t2w.nii.gz" in p and "grid differs" in p
               for p in problems), problems


def test_cli_builds_a_brats_manifest(brats2023, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = main(["manifest", "build", str(brats2023), "--layout", "brats", "--channels", "t2f", "t1c",
                 "--output", str(out), "--quiet"])
    assert code == 0 and "4 cases" in capsys.readouterr().out
    assert json.loads(out.read_text())["training"][0]["channels"] == ["t2f", "t1c"]
