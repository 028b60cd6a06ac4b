"""The case page's parts that need no browser: its images within the size budget, the RANO diameters
drawn, the viewer copied into a run; the pages in Chromium are tested with the runs that write them
(tests/batch/test_follow_up.py, tests/bundles/test_unet3d_brain_tumor.py)."""

from __future__ import annotations

import base64
import gzip
import json
import logging
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from pipelines.batch.outputs import CasePageOutput, default_outputs
from pipelines.batch.outputs.page import diameter_map
from pipelines.batch.viewer import NIIVUE_VERSION, install_viewer, page_images, viewer_script
from pipelines.metrics.rano import LesionDiameters
from tests.conftest import REPO


def _read(text: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(text)))


def _head(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(800, 200, shape) * (rng.random(shape) > 0.3)).astype(np.float32)


def test_every_voxel_when_it_fits_and_the_values_come_back_in_their_units():
    affine = np.diag([0.9, 0.9, 1.2, 1.0])
    affine[:3, 3] = (-80, -100, -60)
    image = _head((40, 50, 30))
    labels = np.zeros((40, 50, 30), np.uint8)
    labels[10:20, 10:20, 5:15] = 2
    made = page_images({"t2f": image}, {"labels": labels}, affine)
    assert made.steps == (1, 1, 1) and set(made.images) == {"t2f", "labels"}
    shown, mask = _read(made.images["t2f"]), _read(made.images["labels"])
    assert np.allclose(shown.affine, affine) and np.array_equal(np.asarray(mask.dataobj), labels)
    low, high = made.windows["t2f"]
    inside = (image >= low) & (image <= high)
    step = (high - low) / 255  # one of the 256 levels
    assert np.abs(shown.get_fdata()[inside] - image[inside]).max() <= step / 2 + 1e-3
    assert shown.get_data_dtype() == np.uint8


def test_past_the_budget_thin_slices_are_thinned_first_then_the_finest_axes():
    image = _head((96, 96, 96))
    labels = np.zeros(image.shape, np.uint8)
    iso = page_images({"a": image}, {"labels": labels}, np.eye(4), through=2, budget=400_000)
    assert iso.size <= 400_000 and iso.steps[2] >= iso.steps[0] == iso.steps[1] > 0 and iso.steps != (1, 1, 1)
    assert np.allclose(_read(iso.images["a"]).affine[:3, :3], np.diag(iso.steps))
    thick = np.diag([0.5, 0.5, 5.0, 1.0])  # a CT of 0.5 mm pixels and 5 mm slices: the pixels give way
    ct = page_images({"a": image}, {"labels": labels}, thick, through=2, budget=400_000)
    assert ct.steps[2] == 1 and ct.steps[0] > 1 and ct.size <= 400_000
    with pytest.raises(ValueError, match="labels map holds values outside 0-255"):
        page_images({"a": image}, {"labels": labels.astype(np.int32) + 300}, np.eye(4))


def test_the_diameters_are_drawn_on_their_slice_on_the_kept_grid():
    lesion = LesionDiameters(lesion=1, slice_index=10, axis=2, longest_mm=20.0, perpendicular_mm=6.0,
                             ends=np.array([[[5, 5], [5, 25]], [[2, 15], [8, 15]]]), slices=3, measurable=True)
    drawn, middles = diameter_map([lesion], (20, 30, 20), (1, 1, 1))
    assert set(np.nonzero(drawn)[2]) == {10}
    assert np.all(drawn[5, 5:26, 10] > 0) and np.sum(drawn[5, :, 10] == 1) == 20  # crossed by the perpendicular
    assert np.all(drawn[2:9, 15, 10] == 2)
    assert middles == {1: [5.0, 15.0, 10.0]}
    halved, _ = diameter_map([lesion], (20, 30, 10), (1, 1, 2))
    assert set(np.nonzero(halved)[2]) == {5} and halved[5, 25, 5] == 1


def test_the_viewer_is_the_pinned_niivue_copied_once_per_run(tmp_path):
    pinned = json.loads((REPO / "package.json").read_text())["dependencies"]["@niivue/niivue"]
    assert pinned == NIIVUE_VERSION
    script = viewer_script()
    if script is None:
        pytest.skip("NiiVue not installed (make web-deps)")
    folder = install_viewer(tmp_path, script)
    copied = folder / "niivue.umd.js"
    assert copied.read_bytes() == script.read_bytes() and "BSD-2-Clause" in (folder / "NOTICE").read_text()
    when = copied.stat().st_mtime_ns
    install_viewer(tmp_path, script)
    assert copied.stat().st_mtime_ns == when  # an equal copy is left as it is (a resumed run)


def test_without_niivue_the_run_says_so_once_and_writes_no_pages(tmp_path, monkeypatch, caplog):
    model = SimpleNamespace(labels={1: "tumor"}, regions={}, lesion_labels=None, enhancing_labels=[], segments=[],
                            qc_inputs=[], input_keys=("image",),
                            name="b", version="1", weights_sha256="x", lesion_scoring=None)
    monkeypatch.setenv("UNET_NIIVUE_JS", str(tmp_path / "missing.js"))
    with caplog.at_level(logging.WARNING):
        outputs = default_outputs(model, output=tmp_path)
    assert not any(isinstance(o, CasePageOutput) for o in outputs)
    assert "no case pages: NiiVue is not installed (run `make web-deps`" in caplog.text
    given = tmp_path / "niivue.umd.js"
    given.write_text("// a build")
    monkeypatch.setenv("UNET_NIIVUE_JS", str(given))
    assert any(isinstance(o, CasePageOutput) for o in default_outputs(model, output=tmp_path))
