"""``unet-pipelines quantize``: a bundle's network as an OpenVINO int8 model, calibrated on the windows
the bundle's own inferer cuts from its validation cases, and written only when it segments those
cases as the float network does.

1. The cases (a manifest section, by default the bundle's manifest's ``validation``; or a folder)
   are loaded and preprocessed as the batch job loads them.
2. Each is segmented by the float network through the bundle's inferer, which hands its windows to a
   recorder: up to ``max_windows`` of them are kept (a seeded reservoir over all the windows, so
   every case and position has the same chance), their case and place in the record.
3. NNCF's post-training quantisation (``performance`` preset: symmetric) runs on those windows, one
   recipe after another until a model passes the gate: every convolution in int8, then 1, 2, 3, 4
   convolutions at each end of the network kept in float32 (where the input's and the output's
   rounding hurt most: the brain bundle's small necrotic core needs 3 at each end).
4. The gate: each case is segmented again by the int8 model (the same inferer, blending and
   postprocessing). For each label and each region of the bundle's metadata, over the cases with
   their voxels pooled, the Dice against the float segmentation must be at least ``min_dice`` and
   the relative volume difference within ``max_volume_difference``.
5. A passing model is written next to the weights (``models/model_int8.xml`` and ``.bin``, then the
   record ``models/model_int8.json``, each under a temporary name then renamed), and the gate's
   figures go into ``configs/metadata.json`` (``int8``). A failing one writes nothing and says
   which label failed by how much.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.batch.bundle import BundleModel
from pipelines.batch.discovery import discover_cases
from pipelines.batch.loading import Loaded, Loading
from pipelines.io.writers import atomic_path

__all__ = ["Int8Calibration", "QuantizationRefused", "bundle_cases", "quantize_bundle"]

logger = logging.getLogger(__name__)

RECIPES = (  # tried in this order; the first that passes the gate is written
    {"name": "every convolution int8", "float_ends": 0},
    *({"name": f"the first and last {n} convolution{'s' * (n > 1)} float32", "float_ends": n} for n in (1, 2, 3, 4)),
)


@dataclass
class Int8Calibration:
    """What ``models/model_int8.json`` holds: how the model was made and how it was checked.

    Attributes:
        weights_sha256: the float weights it was quantized from.
        in_channels: the network's input channels.
        window: the spatial window shape calibrated on (the inferer's; another is refused).
        recipe: the quantisation recipe that passed (:data:`RECIPES`), with the layers kept in float32.
        sample: the windows calibrated on: ``case_id`` and the window's index among those the inferer
            cut from that case, in order.
        cases: the cases checked (the gate's).
        gate: per label and region name (``labels``): ``dice`` and ``volume_difference`` (relative)
            over the cases, ``worst_case_dice``, ``voxels`` (the float segmentation's); the
            thresholds; ``passed``.
        tried: the recipes tried before, with the gate's figures that refused them.
        versions: OpenVINO's and NNCF's.
    """

    weights_sha256: str
    in_channels: int
    window: list[int]
    recipe: dict
    sample: list[dict]
    cases: list[str]
    gate: dict
    tried: list[dict] = field(default_factory=list)
    versions: dict = field(default_factory=dict)


class QuantizationRefused(Exception):
    """No recipe's int8 model passed the gate; nothing was written. ``calibration`` holds the figures."""

    def __init__(self, message: str, calibration: Int8Calibration) -> None:
        super().__init__(message)
        self.calibration = calibration


class _Recorder:
    """Stands where the inferer calls the network: runs it, and keeps a seeded reservoir sample of
    the windows it is given (``(1, C, *window)`` each) with where they came from."""

    def __init__(self, network: torch.nn.Module, keep: int, seed: int) -> None:
        self.network, self.module = network, network  # module: where a valid network's geometry is read
        self.keep, self.rng = keep, random.Random(seed)
        self.case_id, self.index, self.seen = "", 0, 0
        self.kept: list[tuple[dict, np.ndarray]] = []
        self.shapes: set[tuple[int, ...]] = set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for window in x.detach().to("cpu", torch.float32).split(1):
            self.shapes.add(tuple(window.shape[2:]))
            item = ({"case_id": self.case_id, "window": self.index}, window.numpy().copy())
            self.index += 1
            self.seen += 1
            if len(self.kept) < self.keep:
                self.kept.append(item)
            elif (slot := self.rng.randrange(self.seen)) < self.keep:
                self.kept[slot] = item
        return self.network(x)


def _gate(model: BundleModel, reference: Mapping[str, np.ndarray], found: Mapping[str, np.ndarray],
          min_dice: float, max_volume_difference: float) -> dict:
    """Per label and region, over the cases (voxels pooled, so that a case with a few voxels of a label
    weighs as few voxels): the Dice of ``found`` against ``reference`` and the relative volume
    difference; the worst single case's Dice beside them; and whether all pass."""
    figures = {}
    for name, values in model.label_groups.items():
        both = total = ref_volume = found_volume = 0
        worst = 1.0
        for case_id, ref in reference.items():
            a, b = np.isin(ref, values), np.isin(found[case_id], values)
            common, sizes = int((a & b).sum()), int(a.sum()) + int(b.sum())
            if sizes:
                worst = min(worst, 2 * common / sizes)
            both, total, ref_volume, found_volume = both + common, total + sizes, ref_volume + int(a.sum()), found_volume + int(b.sum())
        if total:
            figures[name] = {"dice": round(2 * both / total, 5), "volume_difference": round(
                (found_volume - ref_volume) / max(ref_volume, 1), 5), "worst_case_dice": round(worst, 5), "voxels": ref_volume}
    failed = [f"{name}: Dice {f['dice']:.4f} (at least {min_dice} needed), volume difference "
              f"{100 * f['volume_difference']:+.2f} % (within {100 * max_volume_difference:g} % needed)"
              for name, f in figures.items()
              if f["dice"] < min_dice or abs(f["volume_difference"]) >= max_volume_difference]
    return {"labels": figures, "min_dice": min_dice, "max_volume_difference": max_volume_difference,
            "passed": not failed and bool(figures), "failed": failed if figures else ["no label found in any case"]}


def _segment_all(model: BundleModel, loaded: list[Loaded], runner) -> dict:
    """Each case's label map (numpy) with ``runner`` in the network's place (a :class:`_Recorder` is
    told which case its windows come from)."""
    kept, model.runner = model.runner, runner
    try:
        out = {}
        for item in loaded:
            if isinstance(runner, _Recorder):
                runner.case_id, runner.index = item.case.case_id, 0
            labels, _ = model.predict(item.data)
            out[item.case.case_id] = labels.numpy()
        return out
    finally:
        model.runner = kept


def _quantize(model: BundleModel, windows: list[np.ndarray], recipe: Mapping):
    # OpenVINO and NNCF: optional (the openvino extra) and slow to import
    import nncf
    import openvino

    logging.getLogger("nncf").setLevel(logging.WARNING)  # its INFO lines list every layer it leaves alone
    shape = windows[0].shape
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the network's shape checks, traced as constants
        converted = openvino.convert_model(model.network.eval(), example_input=torch.zeros(shape))
    convolutions = [op.get_friendly_name() for op in converted.get_ordered_ops()
                    if op.get_type_name() in ("Convolution", "ConvolutionBackpropData")]
    n = min(int(recipe["float_ends"]), len(convolutions) // 2)
    kept = convolutions[:n] + convolutions[len(convolutions) - n:]
    quantized = nncf.quantize(converted, nncf.Dataset(windows), subset_size=len(windows),
                              preset=nncf.QuantizationPreset.PERFORMANCE,
                              ignored_scope=nncf.IgnoredScope(names=kept) if kept else None)
    quantized.reshape([-1, *shape[1:]])  # any number of windows per call, of this window size only
    return quantized, kept


def _write(model: BundleModel, quantized, calibration: Int8Calibration) -> Path:
    """The model, then its record, then the metadata, each under a temporary name and renamed: a reader
    finds the record only when the model beside it is complete."""
    from pipelines.inference.runtimes import INT8_MODEL, INT8_RECORD, save_model

    folder = model.root / "models"
    xml = folder / INT8_MODEL
    save_model(quantized, xml)
    _replace_text(folder / INT8_RECORD, json.dumps(asdict(calibration), indent=4) + "\n")
    meta_file = model.root / "configs" / "metadata.json"
    metadata = json.loads(meta_file.read_text())
    metadata["int8"] = {"model": f"models/{INT8_MODEL}", "window": calibration.window, "recipe": calibration.recipe["name"],
                        "cases": len(calibration.cases), "gate": calibration.gate["labels"],
                        "openvino_version": calibration.versions.get("openvino", "")}
    _replace_text(meta_file, json.dumps(metadata, indent=4) + "\n")
    return xml


def _replace_text(path: Path, text: str) -> None:
    with atomic_path(path) as partial:
        partial.write_text(text)


def bundle_cases(bundle: str | os.PathLike) -> tuple[str, str | None]:
    """The bundle's own data: its inference config's ``manifest`` and ``dataset_dir``.

    Raises:
        ValueError: the bundle names no manifest (then ``--input`` is needed).
    """
    from monai.bundle import ConfigParser  # MONAI: see bundle.py

    parser = ConfigParser()
    parser.read_config(str(Path(bundle) / "configs" / "inference.json"))
    parser["bundle_root"] = str(Path(bundle).resolve())
    if "manifest" not in parser:
        raise ValueError(f"{bundle}: its inference config names no `manifest`: give the cases with --input")
    try:
        manifest = str(parser.get_parsed_content("manifest"))
        dataset_dir = str(parser.get_parsed_content("dataset_dir")) if "dataset_dir" in parser else None
    except RuntimeError as exc:  # MONAI wraps what the config's expression raised
        cause = exc.__cause__ if isinstance(exc.__cause__, FileNotFoundError) else exc
        raise ValueError(f"{bundle}: {cause}; or give the cases with --input") from exc
    return manifest, dataset_dir


def quantize_bundle(bundle: str | os.PathLike, source: str | os.PathLike, *, section: str = "validation",
                    dataset_dir: str | os.PathLike | None = None, image_key: str | None = None,
                    max_windows: int = 64, seed: int = 0, min_dice: float = 0.99,
                    max_volume_difference: float = 0.01) -> tuple[Path, Int8Calibration]:
    """Quantizes ``bundle``'s network to int8 on windows of ``source``'s cases, checks it, writes it.

    Args:
        bundle: the bundle folder (its ``models/`` receives the int8 model).
        source: the cases, as the batch job takes them (a manifest, a folder of studies).
        section, dataset_dir, image_key: for a manifest, as the batch job's.
        max_windows: windows calibrated on, at most.
        seed: the sample's seed.
        min_dice, max_volume_difference: the gate (see the module docstring).

    Returns:
        The model written and its calibration record.

    Raises:
        QuantizationRefused: no recipe passed the gate (nothing written).
        ValueError: no case could be loaded (each case's reason named).
    """
    import nncf
    import openvino

    from pipelines.inference.runtimes import OpenVinoNetwork, inferer_window

    model = BundleModel(bundle)  # the float network on torch: the reference
    cases = discover_cases(source, model.series_rules, section=section, dataset_dir=dataset_dir, image_key=image_key)
    with tempfile.TemporaryDirectory() as cache:
        items = list(Loading(cases, model, Path(cache), workers=0, cores=None))
    loaded = [item for item in items if isinstance(item, Loaded)]
    if not loaded:
        raise ValueError(f"{source}: no case could be loaded to calibrate on: "
                         + "; ".join(f"{item.case.case_id}: {getattr(item, 'error', '')}" for item in items))
    recorder = _Recorder(model.network, max_windows, seed)
    reference = _segment_all(model, loaded, recorder)
    if len(recorder.shapes) != 1:
        raise ValueError(f"{bundle}: the inferer cut windows of several shapes {sorted(recorder.shapes)}; "
                         "an int8 model is calibrated for one window size")
    window = list(inferer_window(model.inferer, model.network) or next(iter(recorder.shapes)))
    sample = sorted(recorder.kept, key=lambda kept: (kept[0]["case_id"], kept[0]["window"]))
    windows = [array for _, array in sample]
    logger.info("%s: calibrating on %d of the %d windows of %d cases", model.root.name, len(windows), recorder.seen, len(loaded))
    calibration = Int8Calibration(
        weights_sha256=model.weights_sha256, in_channels=int(windows[0].shape[1]), window=window, recipe={},
        sample=[where for where, _ in sample], cases=[item.case.case_id for item in loaded], gate={},
        versions={"openvino": openvino.__version__.split("-")[0], "nncf": nncf.__version__})
    with tempfile.TemporaryDirectory() as scratch:
        for recipe in RECIPES:
            quantized, kept = _quantize(model, windows, recipe)
            path = Path(scratch) / f"{len(calibration.tried)}.xml"
            openvino.save_model(quantized, path, compress_to_fp16=False)
            runner = OpenVinoNetwork(model.network, "", model_file=path, window=tuple(window))
            gate = _gate(model, reference, _segment_all(model, loaded, runner), min_dice, max_volume_difference)
            logger.info("%s: %s: %s", model.root.name, recipe["name"], "passed" if gate["passed"] else "; ".join(gate["failed"]))
            if gate["passed"]:
                calibration.recipe, calibration.gate = {**recipe, "float32_layers": kept}, gate
                return _write(model, quantized, calibration), calibration
            calibration.tried.append({**recipe, "float32_layers": kept, "gate": gate})
    raise QuantizationRefused(
        f"{bundle}: no int8 model written: the gate failed for every recipe; the last ("
        f"{RECIPES[-1]['name']}): " + "; ".join(calibration.tried[-1]["gate"]["failed"]), calibration)
