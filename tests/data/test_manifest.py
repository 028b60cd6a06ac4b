from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipelines.cli import main
from pipelines.data import build_manifest, check_manifest, load_manifest, read_manifest, resolve_path, split_manifest
from pipelines.io import ManifestError
from tests.conftest import REPO
from tests.io.dicom_factory import SeriesSpec, write_series


@pytest.fixture
def dataset(tmp_path):
    """Two DICOM studies of one patient, one of another, a NIfTI case, and labels for some."""
    root = tmp_path / "data"
    write_series(root / "images" / "study_a", SeriesSpec())
    write_series(root / "images" / "study_b", SeriesSpec(slice_positions=[0.0, 3.0, 6.0]))
    c = write_series(root / "images" / "study_c", SeriesSpec(slice_positions=[0.0, 2.0]))
    for path in c:  # another patient
        ds = pydicom.dcmread(path)
        ds.PatientID = "PAT-0002"
        ds.save_as(path, enforce_file_format=True)
    (root / "labels").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), np.eye(4)), root / "images" / "case_d.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.uint8), np.eye(4)), root / "labels" / "case_d.nii.gz")
    return root


def test_the_shipped_manifests_follow_the_schema():
    for path in (REPO / "data_manifests").glob("*.json"):
        read_manifest(path)


def test_build_describes_every_case(dataset, tmp_path):
    manifest, problems = build_manifest(dataset, images="images", labels="labels")
    cases = {c["case_id"]: c for c in manifest["training"]}
    assert sorted(cases) == ["case_d", "study_a", "study_b", "study_c"]
    assert cases["study_a"]["shape"] == [10, 12, 7] and cases["study_a"]["modality"] == "CT"
    assert cases["study_a"]["spacing"] == pytest.approx([0.7, 0.8, 2.5])
    assert cases["study_a"]["patient"] == cases["study_b"]["patient"] != cases["study_c"]["patient"]
    assert "PAT-0001" not in json.dumps(manifest)  # pseudonymised, never the PatientID itself
    assert cases["case_d"]["label"] == "labels/case_d.nii.gz" and cases["case_d"]["patient"] == "case_d"
    assert len(cases["study_a"]["sha256"]) == 64
    assert sorted(problems) == ["study_a: no label in labels", "study_b: no label in labels", "study_c: no label in labels"]


def test_check_passes_a_good_manifest_and_finds_problems(dataset, tmp_path):
    manifest, _ = build_manifest(dataset, images="images", labels="labels")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(manifest))
    report = check_manifest(good, dataset)
    assert report.ok and report.cases == 4, report.problems

    order = [c["case_id"] for c in manifest["training"]]
    assert order == ["case_d", "study_a", "study_b", "study_c"]
    bad = dict(manifest)
    bad["training"] = [dict(c) for c in manifest["training"]]
    bad["validation"] = [dict(manifest["training"][1])]  # study_a again, in validation
    bad["training"][2]["sha256"] = "0" * 64  # study_b changed since the manifest was built
    bad["training"][0]["label"] = "images/study_a"  # case_d's label on another grid
    bad["test"] = [{"image": "images/missing.nii.gz"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    problems = "\n".join(check_manifest(tmp_path / "bad.json", dataset).problems)
    assert "validation[0] image: images/study_a is also training[1] image" in problems
    assert "training[2] image: images/study_b changed since the manifest was built" in problems
    assert "training[0] label:" in problems and "grid differs" in problems
    assert "test[0] image:" in problems and "missing.nii.gz: no such file or folder" in problems
    assert "appears in ['training', 'validation']: data leak" in problems


@pytest.mark.parametrize("path", ["../outside.nii.gz", "images/../../outside.nii.gz", "/etc/passwd"])
def test_paths_may_not_leave_the_dataset_dir(dataset, tmp_path, path):
    with pytest.raises(ManifestError, match="dataset_dir|absolute"):
        resolve_path(dataset, path, "m.json")
    manifest = tmp_path / "escape.json"
    manifest.write_text(json.dumps({"training": [{"image": path}]}))
    with pytest.raises(ManifestError, match=r"escape.json: training/0/image"):
        load_manifest(manifest, "training", dataset)  # refused by the schema before any path is touched


def test_load_manifest_gives_absolute_paths(dataset, tmp_path):
    manifest, _ = build_manifest(dataset, images="images", labels="labels")
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    cases = load_manifest(tmp_path / "m.json", "training", dataset)
    assert cases[0]["image"] == str(dataset / "images" / "case_d.nii.gz") and cases[0]["case_id"] == "case_d"
    with pytest.raises(ValueError, match="`section` must be one of"):
        load_manifest(tmp_path / "m.json", "train", dataset)
    # a section of the manifest's own (the demo's follow_up) loads like the others, and is named
    (tmp_path / "m2.json").write_text(json.dumps({**manifest, "follow_up": manifest["training"][:1]}))
    assert load_manifest(tmp_path / "m2.json", "follow_up", dataset) == cases[:1]
    with pytest.raises(ValueError, match=r"or of this manifest's \['follow_up'\], got 'followup'"):
        load_manifest(tmp_path / "m2.json", "followup", dataset)


def test_broken_manifests_name_the_file(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ManifestError, match="broken.json: not a readable JSON manifest"):
        read_manifest(tmp_path / "broken.json")
    (tmp_path / "noimage.json").write_text(json.dumps({"training": [{"label": "a.nii"}]}))
    with pytest.raises(ManifestError, match="noimage.json: training/0: 'image' is a required property"):
        read_manifest(tmp_path / "noimage.json")


def test_split_keeps_patients_together():
    cases = [{"image": f"{i}.nii", "patient": f"p{i // 3}"} for i in range(30)]  # 10 patients, 3 cases each
    for fold in range(5):
        split = split_manifest({"training": cases, "test": [{"image": "t.nii"}]}, folds=5, seed=1, validation_fold=fold)
        train = {c["patient"] for c in split["training"]}
        validation = {c["patient"] for c in split["validation"]}
        assert not train & validation and len(split["validation"]) == 6 and split["test"] == [{"image": "t.nii"}]
    assert split_manifest({"training": cases}, 5, seed=1) == split_manifest({"training": cases}, 5, seed=1)
    with pytest.raises(ValueError, match="`folds` must not exceed the 10 patients"):
        split_manifest({"training": cases}, folds=11)


def test_cli_build_check_split(dataset, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["manifest", "build", str(dataset), "--images", "images", "--output", str(out), "--quiet"]) == 0
    assert main(["manifest", "check", str(out), "--dataset-dir", str(dataset), "--quiet"]) == 0
    assert "4 cases, 0 problems" in capsys.readouterr().out
    assert main(["manifest", "split", str(out), "--folds", "2", "--output", str(tmp_path / "s.json")]) == 0
    split = read_manifest(tmp_path / "s.json")
    assert len(split["training"]) + len(split["validation"]) == 4
    assert main(["manifest", "check", str(tmp_path / "nope.json"), "--dataset-dir", str(dataset)]) == 1
    assert "nope.json: manifest not found" in capsys.readouterr().out


def test_image_key_selects_another_path_of_each_case(tmp_path):
    from pipelines.data import load_manifest
    from pipelines.io.errors import ManifestError

    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"test": [{"image": "nifti/a.nii.gz", "dicom": "dicom/a"}, {"image": "b.nii.gz"}]}))
    with pytest.raises(ManifestError, match="test case 1 has no 'dicom' path"):
        load_manifest(manifest, "test", tmp_path, image_key="dicom")
    manifest.write_text(json.dumps({"test": [{"image": "nifti/a.nii.gz", "dicom": "dicom/a"}]}))
    (case,) = load_manifest(manifest, "test", tmp_path, image_key="dicom")
    assert case["image"] == case["dicom"] == str(tmp_path / "dicom" / "a")
    manifest.write_text(json.dumps({"test": [{"image": "a.nii.gz", "dicom": "../../etc"}]}))
    with pytest.raises(ManifestError):
        load_manifest(manifest, "test", tmp_path)


def test_channels_become_keys_in_the_order_asked(tmp_path):
    """A BraTS case lists one file per channel; a bundle asks for a subset in its own order."""
    entry = {"case_id": "a", "image": ["a-t1n.nii.gz", "a-t1c.nii.gz", "a-t2w.nii.gz", "a-t2f.nii.gz"],
             "channels": ["t1n", "t1c", "t2w", "t2f"], "label": "a-seg.nii.gz", "study": "dicom/a"}
    lacking = {"case_id": "b", "image": ["b-t1n.nii.gz", "b-t2f.nii.gz"], "channels": ["t1n", "t2f"]}
    unnamed = {"case_id": "c", "image": ["c-1.nii.gz", "c-2.nii.gz"]}
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"training": [entry], "validation": [lacking], "test": [unnamed]}))
    [case] = load_manifest(manifest, "training", tmp_path, channels=["t2f", "t1c"])
    assert (case["t2f"], case["t1c"]) == (str(tmp_path / "a-t2f.nii.gz"), str(tmp_path / "a-t1c.nii.gz"))
    assert "t1n" not in case and case["image"][0] == str(tmp_path / "a-t1n.nii.gz")
    # the same case as one DICOM study: every channel reads the study, its series picked by rules
    [study] = load_manifest(manifest, "training", tmp_path, image_key="study", channels=["t2f", "t1c"])
    assert study["t2f"] == study["t1c"] == str(tmp_path / "dicom" / "a")
    with pytest.raises(ManifestError, match=r"m.json: validation case b: no 't1c' channel among its \['t1n', 't2f'\]"):
        load_manifest(manifest, "validation", tmp_path, channels=["t2f", "t1c"])
    with pytest.raises(ManifestError, match=r"test case c: `image` lists 2 files but `channels` names 0"):
        load_manifest(manifest, "test", tmp_path, channels=["t1n"])
