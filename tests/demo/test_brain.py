"""The multi-parametric brain tumor demo: contrasts as the sequences show tissues, BraTS labels,
series on their own grids, movement that registration recovers, studies the channel rules read."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from pipelines.cli import main
from pipelines.data import build_brats_manifest, check_manifest, read_manifest
from pipelines.demo.brain import CHANNELS, make_brain_case
from pipelines.demo.brain_dataset import DEMO_SERIES_RULES, SERIES_DESCRIPTIONS, write_brain_demo
from pipelines.demo.synthetic import load_template
from pipelines.io import NoImageDataError, load_volume
from pipelines.io.rules import SeriesRules
from tests.conftest import REPO


@pytest.fixture(scope="module")
def template():
    return load_template()


@pytest.fixture(scope="module")
def one_tumor(template):
    return make_brain_case(template, 21, tumors=1)


def _relative(case, channel: str, value: int) -> float:
    """Median brightness of a label in a channel, relative to normal white matter (bright on T1, dark on T2)."""
    t1, t2 = case.channels["t1n"], case.channels["t2w"]
    brain = t1 > 0.3 * np.percentile(t1, 99)
    white = brain & (case.label == 0) & (t1 > np.percentile(t1[brain], 70)) & (t2 < np.percentile(t2[brain], 40))
    image = case.channels[channel]
    return float(np.median(image[case.label == value]) / np.median(image[white]))


def test_each_sequence_shows_the_tissues_as_radiologists_expect(one_tumor):
    case = one_tumor
    assert set(np.unique(case.label)) == {0, 1, 2, 3}
    assert _relative(case, "t1c", 3) > 1.15 and _relative(case, "t1n", 3) < 0.8  # enhancing on T1c only
    assert _relative(case, "t1n", 1) < 0.4 and _relative(case, "t2w", 1) > 1.8  # necrosis: dark T1, bright T2
    assert _relative(case, "t1c", 1) < 0.4  # never enhancing
    assert _relative(case, "t2f", 2) > 1.6 and _relative(case, "t2w", 2) > 1.6  # edema: bright T2 and FLAIR
    ventricles = (case.label == 0) & (case.channels["t2w"] > 0.9 * np.percentile(case.channels["t2w"], 99.5))
    assert np.median(case.channels["t2f"][ventricles]) < 0.5 * np.median(case.channels["t2w"][ventricles])  # CSF dark


def test_lesions_are_nested_as_brats_labels_them(template, one_tumor):
    core = np.isin(one_tumor.label, (1, 3))
    necrosis = one_tumor.label == 1
    assert not (ndimage.binary_dilation(necrosis) & ~core).any()  # the necrotic core lies within the rim
    assert ndimage.label(core, structure=np.ones((3, 3, 3)))[1] == 1
    two = make_brain_case(template, 12, tumors=2)
    assert ndimage.label(np.isin(two.label, (1, 3)), structure=np.ones((3, 3, 3)))[1] == 2
    small = make_brain_case(template, 13, small=True)
    assert (small.label == 1).sum() == 0 and 0 < (small.label == 3).sum() < 1000  # under 1 mL at 1 mm


def test_series_have_their_own_grids_and_recorded_movement(template, one_tumor):
    acquisitions = one_tumor.acquisitions
    assert set(acquisitions) == {*CHANNELS, "localizer", "dwi"}
    assert np.allclose(acquisitions["t2f"].affine[:3, :3], np.diag((0.7, 0.7, 4.0)))
    assert np.allclose(acquisitions["t1n"].affine[:3, :3], np.eye(3))
    # T1c sagittal (rows to the back, columns down, slices left to right), 0.9 mm in plane
    assert np.allclose(acquisitions["t1c"].affine[:3, :3], [[0, 0, 1.0], [-0.9, 0, 0], [0, -0.9, 0]])
    t1c_shape = acquisitions["t1c"].image.shape
    assert t1c_shape[2] == pytest.approx(acquisitions["t1n"].image.shape[0], abs=1)  # as many slices as T1 columns
    assert all(np.array_equal(a.movement, np.eye(4)) for a in acquisitions.values())
    assert one_tumor.label.shape == acquisitions["t1n"].image.shape and np.array_equal(one_tumor.affine,
                                                                                    acquisitions["t1n"].affine)


def test_registration_recovers_the_patients_movement_within_a_millimetre(template):
    import torch
    from monai.data import MetaTensor

    from pipelines.transforms import RegisterToReferenced

    case = make_brain_case(template, 14, moved=True)
    movement = case.acquisitions["t2f"].movement
    assert np.linalg.norm(movement[:3, 3]) > 1.0
    volumes = {k: MetaTensor(torch.from_numpy(case.acquisitions[k].image[None]),
                             affine=torch.from_numpy(case.acquisitions[k].affine)) for k in ("t1n", "t2f")}
    found = RegisterToReferenced("t2f", "t1n")(volumes)["t2f"].meta["registration"]
    brain = ndimage.binary_fill_holes(case.channels["t1n"] > 0.3 * np.percentile(case.channels["t1n"], 99))
    surface = np.argwhere(brain & ~ndimage.binary_erosion(brain, iterations=2)).T
    points = case.affine @ np.vstack([surface, np.ones(surface.shape[1])])
    residual = np.linalg.norm((np.asarray(found["matrix"]) @ points - movement @ points)[:3], axis=0)
    assert found["kept"] and residual.max() <= 1.0, f"{residual.max():.2f} mm"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("brain") / "demo_brain"
    manifest = write_brain_demo(out, out.parent / "m.json", split={"training": 1, "validation": 1, "test": 1},
                                workers=2)
    return out, manifest


@pytest.mark.slow
def test_studies_hold_six_series_the_channel_rules_tell_apart(written):
    out, manifest = written
    entries = manifest["training"] + manifest["validation"] + manifest["test"]
    assert [e["tumors"] for e in entries] == [1, 2, 1] and [e["moved"] for e in entries] == [False, False, True]
    for vendor, entry in enumerate(entries):
        study = out / entry["study"]
        series = sorted(p.name for p in study.iterdir())
        missing = entry.get("dicom_missing", [])
        assert len(series) == 6 - len(missing)
        for channel, rules in DEMO_SERIES_RULES.items():
            if channel in missing:
                with pytest.raises(NoImageDataError, match="no DICOM series matches the selection rules"):
                    load_volume(study, rules=SeriesRules.of(**rules))
                continue
            volume = load_volume(study, rules=SeriesRules.of(**rules))
            assert volume.meta["series_description"] == SERIES_DESCRIPTIONS[channel][vendor]
        first = pydicom.dcmread(next((study / "06_t1c").glob("*.dcm"))) if not missing else None
        if first is not None:
            assert first.ContrastBolusAgent and first.SeriesNumber == 6  # contrast agent last
            assert [float(v) for v in first.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]  # sagittal
            assert [float(v) for v in first.PixelSpacing] == [0.9, 0.9]
    assert entries[2]["dicom_missing"] == ["t1c"]


@pytest.mark.slow
def test_the_brats_layout_is_read_and_checked_like_a_download(written, tmp_path):
    out, manifest = written
    built, problems = build_brats_manifest(out, images="brats")
    assert problems == [] and [e["case_id"] for e in built["training"]] == [f"BraTS-DEMO-0000{i}-000" for i in range(3)]
    ours = {e["case_id"]: e for s in ("training", "validation", "test") for e in manifest[s]}
    for entry in built["training"]:
        assert entry["image"] == ours[entry["case_id"]]["image"]
        assert entry["sha256"] == ours[entry["case_id"]]["sha256"] and entry["convention"] == "brats2023"
    report = check_manifest(out.parent / "m.json", out)
    assert report.ok, report.problems
    values = set(np.unique(load_volume(out / ours["BraTS-DEMO-00001-000"]["label"]).numpy()).astype(int))
    assert {0, 2, 3} <= values <= {0, 1, 2, 3}


@pytest.mark.slow
def test_a_case_is_the_same_when_written_again(written, tmp_path):
    from pipelines.demo.brain_dataset import _write_case

    out, manifest = written
    entry = _write_case((str(tmp_path), 2, 3, 1000))  # the third case of the data set, alone
    assert entry == manifest["test"][0]
    for path in sorted((out / "dicom" / entry["case_id"]).rglob("IM0000[1-3].dcm")):
        assert path.read_bytes() == (tmp_path / path.relative_to(out)).read_bytes(), path


def test_cli_refuses_bad_counts(tmp_path, capsys):
    assert main(["demo-brain", "--out", str(tmp_path / "b"), "--cases", "1", "-1", "0"]) == 2
    assert "--cases" in capsys.readouterr().err


def test_generated_studies_match_the_committed_manifest():
    """`make test` runs `make demo-brain` first: the files must hash to what the manifest records."""
    from pipelines.data import image_hash

    manifest = read_manifest(REPO / "data_manifests" / "demo_brain.json")
    cases = [c for section in ("training", "validation", "test") for c in manifest[section]]
    assert len(cases) == 22 and sum(c["moved"] for c in cases) == 7 and sum(c["tumors"] == 2 for c in cases) == 6
    data = REPO / "demo_brain"
    if not (data / "brats").is_dir():
        pytest.skip("demo_brain/ not generated (make demo-brain)")
    for case in cases:
        assert image_hash([data / p for p in case["image"]]) == case["sha256"], case["case_id"]
        assert (data / case["study"]).is_dir()
    assert json.loads((REPO / "data_manifests" / "demo_brain.json").read_text())["description"].startswith("Synthetic")
