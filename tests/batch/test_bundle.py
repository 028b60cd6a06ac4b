"""A bundle is the contract: what the batch job needs of it is refused by name when missing, and a
bundle unlike the tumor one (two input series, a sigmoid-region head) runs end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from pipelines.batch import BundleContractError, BundleModel, pseudonym, run_batch
from pipelines.io import load_volume
from pipelines.io.writers import resample_labels, save_nifti
from pipelines.metrics.brats import brats_scores
from pipelines.networks import UNet
from tests.batch.conftest import BUNDLE, DEMO, demo_case
from tests.conftest import REPO


def tumor_copy(tmp_path: Path, change) -> Path:
    """The tumor bundle's configs (its weights linked), with ``change(config)`` applied to inference.json."""
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").symlink_to(BUNDLE / "models" / "model.pt")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    change(config)
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    return bundle


@pytest.mark.parametrize("name", ["network_def", "preprocessing", "inferer", "postprocessing"])
def test_a_bundle_lacking_a_required_id_is_refused_by_name(tmp_path, name):
    bundle = tumor_copy(tmp_path, lambda config: config.pop(name))
    with pytest.raises(BundleContractError, match=rf"inference\.json: lacks the config id\(s\) `{name}`"):
        BundleModel(bundle)
    with pytest.raises(BundleContractError, match=f"`{name}`"):  # before any work: nothing written
        run_batch(bundle, DEMO / demo_case("test", 0)["dicom"], tmp_path / "out")
    assert not any((tmp_path / "out").glob("case-*"))


def test_options_need_their_ids(tmp_path):
    bundle = tumor_copy(tmp_path, lambda config: [config.pop("tta_inferer"), config.pop("probabilities")])
    BundleModel(bundle)  # neither is needed without the options
    with pytest.raises(BundleContractError, match=r"`tta_inferer` \(asked for by --tta\)"):
        BundleModel(bundle, tta=True)
    with pytest.raises(BundleContractError, match=r"`probabilities` \(asked for by --probabilities\)"):
        BundleModel(bundle, probabilities=True)


def test_preprocessing_must_start_with_its_loading_transform(tmp_path):
    def drop_loader(config):
        config["preprocessing"]["transforms"].pop(0)

    with pytest.raises(BundleContractError, match="must be a Compose that starts with its loading transform .*starts with Orientationd"):
        BundleModel(tumor_copy(tmp_path, drop_loader))


def test_several_inputs_need_the_network_input_key(tmp_path):
    def two_inputs(config):
        config["preprocessing"]["transforms"][0]["keys"] = ["t1", "flair"]

    with pytest.raises(BundleContractError, match=r"several input keys \['t1', 'flair'\]: define `network_input_key`"):
        BundleModel(tumor_copy(tmp_path, two_inputs))


LESION_SCORING = r"`lesion_scoring` must map dilation"
LESION_LABELS = r"`lesion_labels` must be a list of label values among \[1, 2\]"
RANO = r'`rano` must be \{"enhancing": \[\.\.\.\]\} of label values among \[1, 2\]'
QC_INPUTS = r"`qc_inputs` must list input keys among \['image'\]"


@pytest.mark.parametrize("key, value, message", [
    *[("lesion_scoring", v, LESION_SCORING)
      for v in ({"dilation": -1}, {"dilation": 1.5}, {"min_lesion_mm3": "50"}, {"radius": 3}, [3])],
    *[("lesion_labels", v, LESION_LABELS) for v in ([3], [], "1", [True], [1.0])],
    *[("qc_inputs", v, QC_INPUTS) for v in (["flair"], "image")],
    *[("rano", v, RANO) for v in ({"enhancing": [3]}, {"enhancing": []}, {"enhanced": [1]}, [1])],
])
def test_malformed_optional_metadata_is_refused_by_name(tmp_path, key, value, message):
    bundle = tumor_copy(tmp_path, lambda config: None)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    (bundle / "configs" / "metadata.json").write_text(json.dumps({**metadata, key: value}))
    with pytest.raises(BundleContractError, match=r"metadata\.json: " + message):
        BundleModel(bundle)


def test_the_tumor_bundle_reads_as_before():
    model = BundleModel(BUNDLE)
    assert model.input_keys == ("image",) and model.network_input_key == model.reference_key == "image"
    assert model.labels == {1: "tumor", 2: "edema"} and model.regions == {} and model.lesion_scoring == {}
    assert model.lesion_labels == [1]  # a lesion is a tumor; its edema is measured, not counted
    assert [type(t).__name__ for t in model.postprocessing.transforms] == ["Activationsd", "AsDiscreted", "Invertd"]


# ---- a bundle of two inputs with a sigmoid-region head --------------------------------------------

TWO_INPUTS = {
    "imports": ["$import pipelines.inference", "$import pipelines.networks", "$import pipelines.transforms"],
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "series_rules": {"t1": {"description": "(?i)^t1"}, "flair": {"description": "(?i)flair"}},
    "network_input_key": "image",
    "network_def": {"_target_": "pipelines.networks.UNet", "spatial_dims": 3, "in_channels": 2, "out_channels": 2,
                    "features": [4, 8], "padding": "same", "norm": "instance", "act": "leakyrelu"},
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "pipelines.transforms.LoadVolumed", "keys": ["t1", "flair"]},
        {"_target_": "Orientationd", "keys": ["t1", "flair"], "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": ["t1", "flair"], "pixdim": [4.0, 4.0, 4.0], "mode": "bilinear"},
        {"_target_": "NormalizeIntensityd", "keys": ["t1", "flair"], "nonzero": True},
        {"_target_": "ConcatItemsd", "keys": ["t1", "flair"], "name": "image"},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
    ]},
    "inferer": {"_target_": "pipelines.inference.BlendedSlidingWindowInferer", "roi_size": [32, 32, 32]},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        {"_target_": "pipelines.transforms.RegionsToLabelsd", "keys": "pred", "values": [1, 2]},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "t1",
         "nearest_interp": True, "to_tensor": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "/nowhere", "print_log": False},
    ]},
}
METADATA = {"name": "two-input region test", "version": "0.0.1", "labels": {"1": "whole", "2": "core"},
            "regions": {"lesion": [1, 2]}, "lesion_scoring": {"dilation": 1, "min_lesion_mm3": 100}}


@pytest.fixture(scope="module")
def region_bundle(tmp_path_factory) -> Path:
    bundle = tmp_path_factory.mktemp("bundles") / "two_inputs"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps(TWO_INPUTS, indent=2))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=2))
    torch.manual_seed(0)
    network = UNet(3, 2, 2, features=(4, 8), padding="same", norm="instance", act="leakyrelu")
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


def two_series_study(source: Path, target: Path, flair: bool = True) -> dict[str, str]:
    """The demo study as a T1 series and, darker, a FLAIR series of one study (other UIDs)."""
    uids = {"t1": generate_uid(), "flair": generate_uid()}
    study = generate_uid()
    for name, description, scale in (("t1", "T1 axial", 1), ("flair", "FLAIR axial", 2)):
        if name == "flair" and not flair:
            continue
        (target / name).mkdir(parents=True)
        for file in sorted(source.glob("*.dcm")):
            ds = pydicom.dcmread(file)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesDescription = study, uids[name], description
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PixelData = (np.frombuffer(ds.PixelData, dtype=np.uint16) // scale).astype(np.uint16).tobytes()
            ds.save_as(target / name / file.name)
    return {"study": study, **uids}


@pytest.mark.integration
def test_two_inputs_and_region_outputs_run_end_to_end(region_bundle, tmp_path):
    inbox = tmp_path / "in"
    good = [two_series_study(DEMO / demo_case("test", i)["dicom"], inbox / f"s{i}") for i in range(2)]
    lacking = two_series_study(DEMO / demo_case("test", 2)["dicom"], inbox / "s2", flair=False)
    summary = run_batch(region_bundle, inbox, tmp_path / "out", workers=1)
    assert (summary.cases, summary.done, summary.exit_code) == (3, 2, 0)
    for uids, index in zip(good, range(2)):
        case_dir = tmp_path / "out" / pseudonym(uids["study"])
        record = json.loads((case_dir / "record.json").read_text())
        assert record["status"] == "ok"
        inputs = record["source"]["inputs"]
        assert inputs["t1"]["series_instance_uid"] == uids["t1"] and inputs["flair"]["series_instance_uid"] == uids["flair"]
        assert set(record["volumes_ml"]) == {"whole", "core"} and set(record["regions_ml"]) == {"lesion"}
        assert record["regions_ml"]["lesion"] == pytest.approx(sum(record["volumes_ml"].values()), abs=0.01)
        mask = nib.load(case_dir / "mask.nii.gz")
        t1 = load_volume(inbox / f"s{index}" / "t1")
        assert mask.shape == tuple(t1.shape[1:]) and np.allclose(mask.affine, t1.affine, atol=1e-4)  # the T1's grid
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
        assert "seg.dcm" not in record["outputs"]  # no dicom_seg_segments in its metadata
    failed = json.loads((tmp_path / "out" / pseudonym(lacking["study"]) / "record.json").read_text())
    assert failed["status"] == "failed" and "input 'flair'" in failed["error"] and "(?i)flair" in failed["error"]
    assert "no DICOM series matches the selection rules" in failed["error"]


@pytest.mark.integration
def test_two_inputs_from_a_manifest_of_files(region_bundle, tmp_path):
    study = two_series_study(DEMO / demo_case("test", 3)["dicom"], tmp_path / "dicom")
    data = tmp_path / "data"
    for name in ("t1", "flair"):
        volume = load_volume(tmp_path / "dicom" / name)
        save_nifti(volume[0].numpy(), np.asarray(volume.affine), data / f"{name}.nii.gz")
    manifest = tmp_path / "m.json"
    t1, label = load_volume(data / "t1.nii.gz"), load_volume(DEMO / demo_case("test", 3)["label"])
    on_t1 = resample_labels(label[0].numpy(), np.asarray(label.affine), t1.shape[1:], np.asarray(t1.affine))
    save_nifti(on_t1.astype(np.uint8), np.asarray(t1.affine), data / "label.nii.gz")
    entry = {"case_id": "one", "image": "t1.nii.gz", "t1": "t1.nii.gz", "flair": "flair.nii.gz",
             "label": "label.nii.gz"}
    manifest.write_text(json.dumps({"test": [entry, {"case_id": "two", "image": "t1.nii.gz", "t1": "t1.nii.gz"}]}))
    summary = run_batch(region_bundle, manifest, tmp_path / "out", dataset_dir=data, workers=0)
    assert (summary.done, summary.failed) == (1, ["two"])
    from_files = json.loads((tmp_path / "out" / "one" / "record.json").read_text())
    # scored against the label as BraTS scores regions, with the bundle's lesion_scoring
    mask = np.asarray(nib.load(tmp_path / "out" / "one" / "mask.nii.gz").dataobj)
    reference = np.asarray(nib.load(data / "label.nii.gz").dataobj)  # on the grid of t1.nii.gz
    expected = brats_scores(mask, reference, t1.meta["spacing"], {"lesion": [1, 2]},
                            dilation=1, min_lesion_mm3=100)["lesion"].as_dict()
    assert from_files["region_scores"]["lesion"] == pytest.approx(expected, abs=1e-4)
    assert set(from_files["dice"]) == {"whole", "core"}
    header = (tmp_path / "out" / "report.csv").read_text().splitlines()[0].split(",")
    assert {"lesion_dice", "lesion_hd95", "lesion_lesion_dice", "lesion_lesion_hd95"} <= set(header)
    assert from_files["source"]["inputs"]["flair"] == {"kind": "file", "path": str(data / "flair.nii.gz")}
    failed = json.loads((tmp_path / "out" / "two" / "record.json").read_text())
    assert "has no path for input 'flair'" in failed["error"]
    run_batch(region_bundle, tmp_path / "dicom", tmp_path / "from_dicom", workers=0)
    from_dicom = json.loads((tmp_path / "from_dicom" / pseudonym(study["study"]) / "record.json").read_text())
    # the same case either way, to NIfTI's float32 affine (a grid moved by micrometres, resampled)
    assert from_dicom["volumes_ml"] == pytest.approx(from_files["volumes_ml"], rel=0.01)


def test_the_brain_tumor_bundle_resolves_its_optional_ids():
    """Optional ids may be references and expressions: the reference channel by name, the series
    rules from the metadata."""
    from pipelines.demo.brain_dataset import DEMO_SERIES_RULES

    model = BundleModel(REPO / "bundles" / "unet3d_brain_tumor")
    assert model.input_keys == ("t1n", "t1c", "t2w", "t2f") and model.network_input_key == "image"
    assert model.reference_key == "t1n" and model.qc_inputs == ["t2f", "t1c"]
    for key, rules in DEMO_SERIES_RULES.items():
        assert model.series_rules[key].description == rules["description"] and model.series_rules[key].min_slices == 20
    assert model.regions == {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]} and model.lesion_labels == [1, 3]


def _two_channel_weights(path: Path) -> Path:
    """Weights of the brain bundle's network trained on two channels (FLAIR and T1c)."""
    net = UNet(3, 2, 3, features=(16, 32, 64, 128), padding="same", norm="instance", act="leakyrelu",
               up_mode="transpose", skip="concat")
    torch.save({"model": net.state_dict()}, path)
    return path


def test_bundle_overrides_choose_a_channel_subset_with_its_own_series_rules(tmp_path):
    """Weights trained with ``--channels "['t2f', 't1c']"`` run with the same override: two inputs,
    each with its own rule from the metadata (the rules of the channels left out set aside), the
    QC rows among them, the overrides in the record's model and in the bundle's hash."""
    from pipelines.demo.brain_dataset import DEMO_SERIES_RULES

    weights = _two_channel_weights(tmp_path / "model.pt")
    model = BundleModel(REPO / "bundles" / "unet3d_brain_tumor", weights=weights,
                        overrides={"channels": ["t2f", "t1c"]})
    assert model.input_keys == ("t2f", "t1c") and model.reference_key == "t1c" and model.qc_inputs == ["t2f", "t1c"]
    assert set(model.series_rules) == {"t2f", "t1c"}
    for key in ("t2f", "t1c"):
        assert model.series_rules[key].description == DEMO_SERIES_RULES[key]["description"]
    assert model.describe()["overrides"] == {"channels": ["t2f", "t1c"]}
    again = BundleModel(REPO / "bundles" / "unet3d_brain_tumor", weights=weights, overrides={"channels": ["t2f", "t1c"]})
    assert again.bundle_sha256 == model.bundle_sha256
    one = BundleModel(REPO / "bundles" / "unet3d_brain_tumor", weights=weights,
                      overrides={"channels": ["t1c", "t2f"]})  # another order is another network input
    assert one.bundle_sha256 != model.bundle_sha256 and one.qc_inputs == ["t2f", "t1c"]


def test_weights_that_do_not_fit_name_both_shapes_and_the_override(tmp_path):
    weights = _two_channel_weights(tmp_path / "model.pt")
    with pytest.raises(BundleContractError) as caught:
        BundleModel(REPO / "bundles" / "unet3d_brain_tumor", weights=weights)
    message = str(caught.value)
    assert f"{weights}: the weights do not fit the network of" in message
    assert "(16, 2, 3, 3, 3) in the weights, (16, 4, 3, 3, 3) in the network" in message
    assert '`--channels ["t1n", "t1c", "t2w", "t2f"]`' in message and "pass the bundle overrides" in message
    with pytest.raises(BundleContractError, match=r"`--chanels` names no config id of the bundle"):
        BundleModel(REPO / "bundles" / "unet3d_brain_tumor", weights=weights, overrides={"chanels": ["t2f", "t1c"]})
