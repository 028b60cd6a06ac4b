from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from pipelines.cli import main
from pipelines.data import load_manifest, read_manifest
from pipelines.demo import LABELS, load_template, make_case, write_demo_data
from pipelines.demo.dataset import write_dicom_series
from pipelines.io import load_volume


@pytest.fixture(scope="module")
def template():
    return load_template()


def test_template_is_the_real_mni152_anatomy(template):
    assert template.t1.shape == template.gm.shape == template.wm.shape == (197, 233, 189)
    assert np.allclose(np.abs(np.diag(template.affine)[:3]), 1.0)
    # grey and white matter where the T1 says so: white matter is brighter than grey on T1
    assert template.t1[template.wm > 0.9].mean() > template.t1[template.gm > 0.9].mean() > 0.2


def test_cases_are_deterministic_and_varied(template):
    a, b, c = make_case(template, 3), make_case(template, 3), make_case(template, 4)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    assert not np.allclose(a.affine, c.affine)


@pytest.mark.parametrize("seed", [0, 7, 21])
def test_labels_are_exact_lesions_inside_the_head(template, seed):
    case = make_case(template, seed)
    assert set(np.unique(case.label)) <= set(LABELS.values())
    tumor, edema = case.label == LABELS["tumor"], case.label == LABELS["edema"]
    voxel_ml = np.prod(np.abs(np.diag(case.affine)[:3])) / 1000
    assert 1.0 < tumor.sum() * voxel_ml < 200.0  # a few mL up to a large glioma
    assert (case.image[tumor | edema] > 0).all()  # lesions lie in tissue, not in the air
    # the painted contrast is where the label says: tumor voxels differ from the ring just outside
    from scipy import ndimage

    ring = ndimage.binary_dilation(tumor, iterations=2) & ~tumor & ~edema
    if ring.sum() > 20 and tumor.sum() > 20:
        assert abs(np.median(case.image[tumor]) - np.median(case.image[ring])) > 100


def test_dicom_study_has_the_nifti_values_and_geometry(tmp_path):
    manifest = write_demo_data(tmp_path / "demo", tmp_path / "m.json", split={"training": 1, "test": 1})
    assert read_manifest(tmp_path / "m.json") == manifest
    entry = manifest["test"][0]
    nifti = load_volume(tmp_path / "demo" / entry["image"])
    dicom = load_volume(tmp_path / "demo" / entry["dicom"])
    assert dicom.meta["modality"] == "MR" and dicom.meta["geometry_corrections"] in ("[]", "", None)
    # the DICOM grid runs left and posterior (usual axial orientation): flip x and y to compare
    np.testing.assert_array_equal(nifti.numpy()[:, ::-1, ::-1], dicom.numpy())
    corner = np.array([nifti.shape[1] - 1, nifti.shape[2] - 1, 0, 1])
    np.testing.assert_allclose(nifti.affine.numpy() @ corner, dicom.affine.numpy() @ [0, 0, 0, 1], atol=1e-3)
    files = sorted((tmp_path / "demo" / entry["dicom"]).iterdir())
    assert len(files) == nifti.shape[3]
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.PatientID == entry["patient"]
    assert ds.BitsStored == 12 and list(ds.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
    assert entry["spacing"] == pytest.approx(list(dicom.meta["spacing"]), abs=1e-5)
    # the image key can point the bundles at the DICOM studies
    (case,) = load_manifest(tmp_path / "m.json", "test", tmp_path / "demo", image_key="dicom")
    assert case["image"] == str(tmp_path / "demo" / entry["dicom"])


def test_data_set_bytes_are_reproducible(tmp_path):
    write_demo_data(tmp_path / "a", tmp_path / "a.json", split={"training": 1}, dicom=True)
    write_demo_data(tmp_path / "b", tmp_path / "b.json", split={"training": 1}, dicom=True)
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes(), path
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_rewrite_replaces_the_data_set_and_keeps_it_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    write_demo_data(out, None, split={"training": 1}, dicom=False)
    before = sorted(p.name for p in (out / "nifti").iterdir())

    import pipelines.demo.dataset as dataset

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(dataset, "make_case", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_demo_data(out, None, split={"training": 2}, dicom=False)
    assert sorted(p.name for p in (out / "nifti").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no staging folder left behind


def test_dicom_writer_refuses_bad_volumes(tmp_path):
    with pytest.raises(ValueError, match="12-bit"):
        write_dicom_series(np.full((4, 4, 2), 5000), np.eye(4), tmp_path, "P", "k")
    sheared = np.eye(4)
    sheared[:3, :3] = [[1, 0.2, 0], [0, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="orthogonal"):
        write_dicom_series(np.zeros((4, 4, 2)), sheared, tmp_path, "P", "k")
    with pytest.raises(ValueError, match="towards the head"):
        write_dicom_series(np.zeros((4, 4, 2)), np.diag([1.0, 1.0, -1.0, 1.0]), tmp_path, "P", "k")


@pytest.mark.parametrize("name, directions", [
    ("sagittal", [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]),
    ("coronal", [[1, 0, 0], [0, 0, 1], [0, -1, 0]]),
    ("oblique", [[0.9659258, 0, -0.2588190], [0, 1, 0], [0.2588190, 0, 0.9659258]]),  # 15 degrees about y
])
def test_dicom_writer_writes_any_orthogonal_grid_where_it_lies(tmp_path, name, directions):
    """A series not axial is written as it lies: read back, every voxel is where the affine put it."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(directions) * [0.9, 0.8, 1.5]
    affine[:3, 3] = [-40.0, 25.0, 10.0]
    stored = np.random.default_rng(5).integers(0, 4096, size=(7, 6, 5)).astype(np.uint16)
    paths = write_dicom_series(stored, affine, tmp_path / name, "P", "k", series_key=name)
    first = pydicom.dcmread(paths[0])
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([0.8, 0.9])
    volume = load_volume(tmp_path / name)
    read = volume.affine.numpy()
    world = read[:3, :3] @ np.indices(volume.shape[1:]).reshape(3, -1) + read[:3, 3:4]
    index = np.linalg.solve(affine[:3, :3], world - affine[:3, 3:4])  # where each voxel read lay as written
    assert np.allclose(index, np.rint(index), atol=1e-3)
    i, j, k = np.rint(index).astype(int)
    np.testing.assert_array_equal(volume[0].numpy().reshape(-1), stored[i, j, k])


def test_cli_writes_the_data_set(tmp_path, capsys):
    code = main(["demo-data", "--out", str(tmp_path / "d"), "--manifest", str(tmp_path / "m.json"),
                 "--cases", "1", "1", "0", "--no-dicom"])
    assert code == 0
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert [len(manifest[s]) for s in ("training", "validation", "test")] == [1, 1, 0]
    assert not (tmp_path / "d" / "dicom").exists()
    assert main(["demo-data", "--out", str(tmp_path / "e"), "--cases", "1", "-1", "0"]) == 2
    assert "--cases" in capsys.readouterr().err


def test_generated_data_set_matches_the_committed_manifest():
    """`make test` runs `make demo-data` first: the files must hash to what the committed manifest
    records, i.e. the data set is the same on this machine as on the one that trained the weights."""
    from pipelines.io.hashing import content_hash
    from tests.conftest import REPO

    data = REPO / "demo_data"
    if not (data / "nifti").is_dir():
        pytest.skip("demo_data/ not generated (make demo-data)")
    manifest = read_manifest(REPO / "data_manifests" / "demo_tumor.json")
    cases = [c for section in ("training", "validation", "test") for c in manifest[section]]
    assert len(cases) == 40
    for case in [*cases, *manifest["follow_up"]]:
        assert content_hash(data / case["image"]) == case["sha256"], case["case_id"]


def test_the_follow_up_patient_has_two_dated_studies_a_grown_and_a_new_lesion(tmp_path, template):
    """One PatientID, two StudyDates 91 days apart, other grids and another position in the scanner;
    lesion 1 grows by the growth factor in each radius, lesion 2 appears; the label maps agree with
    the numbered lesions."""
    from pipelines.demo.dataset import FOLLOW_UP_DATES, FOLLOW_UP_PATIENT, write_follow_up
    from pipelines.demo.synthetic import make_follow_up

    entries = write_follow_up(tmp_path, template, 1003)
    headers = [pydicom.dcmread(next((tmp_path / e["dicom"]).glob("*.dcm")), stop_before_pixels=True) for e in entries]
    assert [h.PatientID for h in headers] == [FOLLOW_UP_PATIENT] * 2
    assert [h.StudyDate for h in headers] == list(FOLLOW_UP_DATES) and headers[0].StudyInstanceUID != headers[1].StudyInstanceUID
    pair = make_follow_up(template, 1003)
    assert pair.baseline.image.shape != pair.follow_up.image.shape
    rotation = np.degrees(np.arccos((np.trace(pair.pose[:3, :3]) - 1) / 2))
    assert 3 <= rotation <= 5.01
    volumes = []
    for case, numbered in zip((pair.baseline, pair.follow_up), pair.lesion_labels):
        assert np.array_equal(numbered > 0, case.label == LABELS["tumor"])
        voxel_ml = abs(np.linalg.det(case.affine[:3, :3])) / 1000
        volumes.append([(numbered == i).sum() * voxel_ml for i in (1, 2)])
    assert volumes[0][1] == 0 and volumes[1][1] > 5  # new at follow-up
    assert volumes[1][0] / volumes[0][0] == pytest.approx(pair.growth**3, rel=0.15)  # grown in each radius
    nifti = load_volume(tmp_path / entries[1]["image"])
    dicom = load_volume(tmp_path / entries[1]["dicom"])
    np.testing.assert_array_equal(nifti.numpy()[:, ::-1, ::-1], dicom.numpy())
