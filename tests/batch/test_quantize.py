"""``unet-pipelines quantize`` and the ``openvino-int8`` runtime: a gated int8 model written beside the
weights and run by the batch job; nothing written when the gate fails; an int8 model that does not fit
(none made, other weights, another window) refused by name."""

from __future__ import annotations

import json
import shutil

import pytest

from pipelines.batch import BundleContractError, BundleModel
from pipelines.batch.quantize import QuantizationRefused, quantize_bundle
from pipelines.inference.runtimes import INT8_MODEL, INT8_RECORD, Int8Model, inferer_window
from tests.batch.conftest import BUNDLE, DEMO, demo_case, on_torch_and

openvino = pytest.importorskip("openvino", reason="OpenVINO not installed (the openvino extra)")
pytest.importorskip("nncf", reason="NNCF not installed (the openvino extra)")
REPO_BUNDLES = BUNDLE.parent


def _bundle_and_cases(tmp_path, cases: int = 2):
    """A copy of the tumor bundle without its int8 model, and a manifest of ``cases`` validation cases."""
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("model_int8.*"))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta.pop("int8", None)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
    manifest = tmp_path / "cases.json"
    manifest.write_text(json.dumps({"validation": [demo_case("validation", i) for i in range(cases)]}))
    return bundle, manifest


@pytest.mark.integration
def test_a_gated_int8_model_is_written_and_segments_as_the_float_network(tmp_path):
    bundle, manifest = _bundle_and_cases(tmp_path)
    path, _ = quantize_bundle(bundle, manifest, dataset_dir=DEMO, max_windows=12, seed=3)
    assert path == bundle / "models" / INT8_MODEL and path.with_suffix(".bin").stat().st_size > 100_000
    record = json.loads((bundle / "models" / INT8_RECORD).read_text())
    assert record["window"] == [64, 64, 64] and record["in_channels"] == 1
    assert len(record["sample"]) == 12 and {s["case_id"] for s in record["sample"]} <= set(record["cases"])
    assert len(record["cases"]) == 2 and record["gate"]["passed"]
    assert {"tumor", "edema"} <= set(record["gate"]["labels"])
    assert all(f["dice"] >= 0.99 and abs(f["volume_difference"]) < 0.01 for f in record["gate"]["labels"].values())
    text = (bundle / "configs" / "metadata.json").read_text()
    assert text == json.dumps(json.loads(text), indent=4) + "\n"  # as the zoo formats it
    assert json.loads(text)["int8"]["gate"] == record["gate"]["labels"]
    assert not list((bundle / "models").glob(".*"))  # no temporary file left

    # the batch job on the int8 model: the case as on torch, the model file in the record
    _, on_int8, a, b = on_torch_and("openvino-int8", bundle, 0, tmp_path)
    assert a.any() and 2 * ((a > 0) & (b > 0)).sum() / ((a > 0).sum() + (b > 0).sum()) > 0.98
    found = json.loads((on_int8 / "record.json").read_text())
    assert found["settings"]["runtime"] == f"openvino-int8 {openvino.__version__.split('-')[0]}"
    assert found["model"]["int8_model"] == INT8_MODEL and len(found["model"]["int8_model_sha256"]) == 64


@pytest.mark.integration
def test_a_gate_no_recipe_passes_writes_nothing(tmp_path, monkeypatch):
    from pipelines.batch import quantize

    bundle, manifest = _bundle_and_cases(tmp_path, cases=1)
    before = (bundle / "configs" / "metadata.json").read_text()
    monkeypatch.setattr(quantize, "RECIPES", quantize.RECIPES[:1])
    with pytest.raises(QuantizationRefused, match=r"no int8 model written.*Dice .* \(at least 1\.01 needed\)") as refused:
        quantize_bundle(bundle, manifest, dataset_dir=DEMO, max_windows=4, min_dice=1.01)
    assert refused.value.calibration.tried[0]["gate"]["passed"] is False
    assert not list((bundle / "models").glob("model_int8*")) and not list((bundle / "models").glob(".*"))
    assert (bundle / "configs" / "metadata.json").read_text() == before


def test_an_int8_model_that_does_not_fit_is_refused_by_name(tmp_path):
    bundle, _ = _bundle_and_cases(tmp_path)
    with pytest.raises(BundleContractError, match=r"no calibrated int8 model .*run `unet-pipelines quantize --bundle"):
        BundleModel(bundle, runtime="openvino-int8")
    weights = BundleModel(bundle).weights_sha256
    models = bundle / "models"
    (models / INT8_MODEL).write_text("<net/>")
    models.joinpath(INT8_MODEL).with_suffix(".bin").write_bytes(b"\0")
    record = {"weights_sha256": "0" * 64, "in_channels": 1, "window": [64, 64, 64]}
    (models / INT8_RECORD).write_text(json.dumps(record))
    with pytest.raises(BundleContractError, match=r"quantized from other weights \(sha256 000000000000\.\.\., these are"):
        BundleModel(bundle, runtime="openvino-int8")
    (models / INT8_RECORD).write_text(json.dumps({**record, "weights_sha256": weights, "window": [96, 96, 96]}))
    with pytest.raises(BundleContractError, match=r"calibrated on windows of 96x96x96, the inferer's are 64x64x64"):
        BundleModel(bundle, runtime="openvino-int8")
    (models / INT8_RECORD).write_text(json.dumps({**record, "weights_sha256": weights}))
    assert BundleModel(bundle, runtime="openvino-int8").int8.window == (64, 64, 64)  # fits: accepted


@pytest.mark.parametrize("name", ["unet3d_tumor", "unet3d_brain_tumor", "unet2d_isbi2012"])
def test_the_shipped_int8_models_fit_the_shipped_weights(name):
    """Weights retrained without quantizing again would leave an int8 model of other weights; the
    window is the network's input (for the valid ISBI network, the input of its output tile)."""
    bundle = REPO_BUNDLES / name
    record = json.loads((bundle / "models" / INT8_RECORD).read_text())
    found = BundleModel(bundle)
    model = Int8Model.of_bundle(bundle, found.weights_sha256, record["in_channels"],
                                inferer_window(found.inferer, found.network))
    assert model.record["gate"]["passed"]
    assert all(f["dice"] >= 0.99 for f in model.record["gate"]["labels"].values())
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["int8"]["gate"] == model.record["gate"]["labels"]
