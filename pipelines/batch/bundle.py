"""A bundle is the contract: what the batch job reads from ``configs/inference.json`` and
``metadata.json``, loaded once for a run.

The config ids it requires and takes (:data:`REQUIRED_IDS`, :data:`OPTIONAL_IDS`) and the metadata
keys it reads are written in docs/reference/bundle-contract.md and docs/reference/metadata.md;
``tests/test_docs.py`` holds that page to these tuples.

A bundle is code: its configs evaluate Python expressions when they are parsed. Run only bundles you
trust. The weights load with ``torch.load(..., weights_only=True)`` (no pickled code).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from pipelines.batch.errors import BundleContractError
from pipelines.batch.metadata import label_names, label_values, lesion_scoring
from pipelines.io.hashing import content_hash
from pipelines.io.rules import SeriesRules
from pipelines.io.weights import mismatched_tensors
from pipelines.segment_codes import segments_from_metadata

__all__ = ["OPTIONAL_IDS", "PRED", "PROB", "REQUIRED_IDS", "BundleModel", "bundle_hash"]

REQUIRED_IDS = ("network_def", "preprocessing", "inferer", "postprocessing")
OPTIONAL_IDS = ("series_rules", "network_input_key", "reference_key", "tta_inferer", "probabilities", "runtime")
PRED, PROB = "pred", "prob"  # MONAI's engine keys (CommonKeys.PRED) for the network output, and ours


def _optional(parser, config_id: str):
    """An optional config id's value, its references and expressions resolved (``"@reference_channel"``,
    ``"$@_meta_#series_rules"``); None when the config lacks it."""
    if config_id not in parser:
        return None
    return parser.get_parsed_content(config_id)


def bundle_hash(bundle_dir: str | os.PathLike, weights: str | os.PathLike | None = None) -> str:
    """SHA-256 of what inference uses of a bundle: its ``configs`` folder (relative names and contents)
    and the weights file (default ``models/model.pt``).

    Other files in ``models/`` (a training run's ``last_checkpoint_*.pt``, exports) are left out: they
    do not change the results, and a training run next to a batch job must not make its rerun redo
    every case (nor cost a read of gigabytes of checkpoints at each start).
    """
    root = Path(bundle_dir)
    weights_path = Path(weights) if weights else root / "models" / "model.pt"
    return _bundle_digest(root, content_hash(weights_path) if weights_path.exists() else "")


def _bundle_digest(root: Path, weights_sha256: str, overrides: Mapping | None = None) -> str:
    """:func:`bundle_hash` from the weights' SHA-256 already computed; bundle overrides (when any)
    are part of it, as they change what the configs build."""
    configs = root / "configs"
    parts = [content_hash(configs) if configs.exists() else "", weights_sha256]
    if overrides:
        parts.append(json.dumps(overrides, sort_keys=True, default=str))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# MONAI (its transforms, bundle parser and MetaTensor) is imported where a bundle is loaded or run, not
# with this module: it takes seconds and imports Ignite, which `import pipelines.batch` (the CLI's
# --help, the lock, the reports) must not pay for (tests/test_visualize.py).


def _loading_transform_types() -> tuple[type, ...]:
    from monai.transforms import LoadImaged

    from pipelines.transforms import LoadVolumed

    return LoadVolumed, LoadImaged


def _is_saver(transform) -> bool:
    from monai.transforms import SaveImage, SaveImaged

    return isinstance(transform, (SaveImage, SaveImaged))


def _compose_without(compose, drop) -> object:
    """``compose`` (a MONAI ``Compose``) without the transforms ``drop`` picks, its settings kept;
    the transform objects themselves are shared (``Invertd`` matches them by identity)."""
    from monai.transforms import Compose

    kept = [t for t in compose.transforms if not drop(t)]
    return Compose(kept, map_items=compose.map_items, unpack_items=compose.unpack_items, log_stats=compose.log_stats,
                   lazy=compose.lazy, overrides=compose.overrides)


class BundleModel:
    """A bundle's inference, loaded once for a batch run (see the module docstring for the contract).

    Args:
        bundle_dir: the bundle folder.
        device: where the network runs.
        weights: weights file (default: the config's ``ckpt_path``, else ``models/model.pt``): a state
            dict, or a checkpoint holding one under ``model``.
        tta: use the bundle's ``tta_inferer``.
        probabilities: the run writes probabilities: the bundle's ``probabilities`` transform is needed.
        overrides: config id -> value, set on the inference config before anything is built, as
            ``python -m monai.bundle run --id value`` sets them (``{"channels": ["t2f", "t1c"]}``).
        runtime: where the network runs on the CPU (:data:`pipelines.inference.runtimes.RUNTIMES`);
            None: the config's ``runtime``, else ``torch``.

    Raises:
        BundleContractError: a required config id (or one the options need) is missing,
            ``preprocessing`` does not start with a loading transform, an override names no config
            id, the weights do not fit the network, or the runtime is unknown or unusable; the message
            names it.
        FileNotFoundError: no bundle configs or weights.
    """

    def __init__(self, bundle_dir: str | os.PathLike, device: str | torch.device = "cpu",
                 weights: str | os.PathLike | None = None, tta: bool = False, probabilities: bool = False,
                 overrides: Mapping[str, object] | None = None, runtime: str | None = None) -> None:
        from monai.bundle import ConfigParser

        from pipelines.inference.runtimes import Int8Model, inferer_window, int8_for, on_runtime

        self.root = Path(bundle_dir).resolve()
        config = self.root / "configs" / "inference.json"
        meta_file = self.root / "configs" / "metadata.json"
        for required in (config, meta_file):
            if not required.is_file():
                raise FileNotFoundError(f"{required}: missing; {self.root} is not a bundle with an inference config")
        self.device = torch.device(device)
        parser = ConfigParser()
        parser.read_meta(str(meta_file))
        parser.read_config(str(config))
        self.overrides = dict(overrides or {})
        unknown = [key for key in self.overrides if key not in parser]
        if unknown:
            raise BundleContractError(
                f"{config}: " + ", ".join(f"`--{key}`" for key in unknown) + " names no config id of the bundle "
                "(bundle overrides take the ids of its inference config, as `python -m monai.bundle run` does)")
        for key, value in self.overrides.items():
            parser[key] = value
        parser["bundle_root"] = str(self.root)
        parser["device"] = f"$torch.device('{self.device}')"
        needed = [*REQUIRED_IDS, *(["tta_inferer"] if tta else []), *(["probabilities"] if probabilities else [])]
        missing = [name for name in needed if name not in parser]
        if missing:
            why = {"tta_inferer": " (asked for by --tta)", "probabilities": " (asked for by --probabilities)"}
            raise BundleContractError(
                f"{config}: lacks the config id(s) " + ", ".join(f"`{m}`{why.get(m, '')}" for m in missing)
                + "; see docs/reference/bundle-contract.md"
            )
        self.metadata: dict = json.loads(meta_file.read_text())
        self.name = str(self.metadata.get("name", self.root.name))
        self.version = str(self.metadata.get("version", ""))

        preprocessing = parser.get_parsed_content("preprocessing")
        transforms = list(getattr(preprocessing, "transforms", ()))
        loading = _loading_transform_types()
        if not transforms or not isinstance(transforms[0], loading):
            raise BundleContractError(
                f"{config}: `preprocessing` must be a Compose that starts with its loading transform "
                f"({' or '.join(t.__name__ for t in loading)}), whose keys name the inputs; it starts with "
                f"{type(transforms[0]).__name__ if transforms else 'nothing'}"
            )
        self.input_keys: tuple[str, ...] = tuple(str(k) for k in transforms[0].keys)
        self.preprocessing = _compose_without(preprocessing, lambda t: t is transforms[0])
        self.load_options = dict(getattr(getattr(transforms[0], "loader", None), "options", {}))
        self.series_rules = self._rules(parser, transforms[0], config)
        self.network_input_key = self._network_input_key(parser, config)
        reference = _optional(parser, "reference_key") or (
            self.network_input_key if self.network_input_key in self.input_keys else self.input_keys[0])
        if reference not in self.input_keys:
            raise BundleContractError(f"{config}: `reference_key` must be one of the input keys "
                                      f"{list(self.input_keys)}, got {reference!r}")
        self.reference_key = str(reference)
        self.postprocessing = _compose_without(parser.get_parsed_content("postprocessing"), _is_saver)
        self.probability_transform = (
            _compose_without(parser.get_parsed_content("probabilities"), _is_saver) if probabilities else None)
        self.inferer = parser.get_parsed_content("tta_inferer" if tta else "inferer")

        self.network = parser.get_parsed_content("network_def").to(self.device).eval()
        self.weights_path = Path(weights or _optional(parser, "ckpt_path") or self.root / "models" / "model.pt")
        if not self.weights_path.is_file():
            raise FileNotFoundError(f"{self.weights_path}: bundle weights not found")
        state = torch.load(self.weights_path, map_location=self.device, weights_only=True)
        if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]
        self._load_weights(state, parser)
        self.weights_sha256 = content_hash(self.weights_path)
        self.bundle_sha256 = _bundle_digest(self.root, self.weights_sha256, self.overrides)  # weights read once
        self.runtime = str(runtime or _optional(parser, "runtime") or "torch")
        try:
            self.int8: Int8Model | None = int8_for(self.runtime, self.device, self.root, self.weights_sha256,
                                                   getattr(self.network, "in_channels", None),
                                                   inferer_window(self.inferer, self.network))
        except ValueError as exc:
            raise BundleContractError(str(exc) if runtime else f"{config}: `runtime`: {exc}") from exc
        self.runner = on_runtime(self.network, self.runtime, self.bundle_sha256, self.root.name,  # what the inferer calls
                                 model_file=self.int8 and self.int8.xml, window=self.int8 and self.int8.window)
        self.labels = label_names(self.metadata, meta_file)
        self.regions = {str(k): [int(v) for v in values] for k, values in (self.metadata.get("regions") or {}).items()}
        # what overlap and volume are compared over: each label alone, then each region
        self.label_groups = {name: [value] for value, name in self.labels.items()} | self.regions
        self.lesion_scoring = lesion_scoring(self.metadata, meta_file)
        self.lesion_labels = label_values(self.metadata, "lesion_labels", self.labels, meta_file)
        self.enhancing_labels = label_values(self.metadata, "rano", self.labels, meta_file, within="enhancing")
        self.non_enhancing_labels = label_values(self.metadata, "rano", self.labels, meta_file, within="non_enhancing") \
            if "non_enhancing" in (self.metadata.get("rano") or {}) else None
        self.segments = self._segments()
        self.qc_inputs = self._qc_inputs(meta_file)
        self.report_columns = self.metadata.get("report_columns")
        if self.report_columns is not None and (not isinstance(self.report_columns, list)
                                                or not all(isinstance(c, str) for c in self.report_columns)):
            raise BundleContractError(f"{meta_file}: `report_columns` must list column names of report.csv, "
                                      f"got {self.report_columns!r}")

    def _load_weights(self, state: Mapping, parser) -> None:
        """The weights into the network; weights of another shape (trained with other ``channels``,
        ``features``, ...) are a :class:`BundleContractError` naming the first tensors that differ,
        both shapes and the overrides that set them."""
        differ, missing = mismatched_tensors(state, self.network)
        if differ or missing:
            shapes = "; ".join(differ[:3])
            hint = ", ".join(f"`--{key} {parser[key]!r}`".replace("'", '"') for key in ("channels", "features")
                             if key in parser and key not in self.overrides)
            raise BundleContractError(
                f"{self.weights_path}: the weights do not fit the network of {self.root / 'configs' / 'inference.json'}"
                + (f" ({shapes})" if shapes else "") + (f"; missing from the weights: {', '.join(missing[:3])}"
                                                         if missing else "")
                + "; pass the bundle overrides the weights were trained with"
                + (f" (these configs have {hint})" if hint else "")
            )
        self.network.load_state_dict(state)

    def _rules(self, parser, loader, config: Path) -> dict[str, SeriesRules]:
        """Each input key's DICOM series rules: the loading transform's, then ``series_rules``."""
        base = getattr(getattr(loader, "loader", None), "rules", None) or SeriesRules()
        given = _optional(parser, "series_rules") or {}
        if not isinstance(given, Mapping):
            raise BundleContractError(f"{config}: `series_rules` must be a mapping, got {type(given).__name__}")
        # per input key when every value is a mapping (no SeriesRules field is one); rules for keys the
        # bundle does not use now (another channel subset) are left aside
        per_key = bool(given) and all(isinstance(v, Mapping) for v in given.values())
        try:
            return {key: SeriesRules.of(base, **dict(given.get(key, {}) if per_key else given))
                    for key in self.input_keys}
        except (TypeError, ValueError) as exc:
            raise BundleContractError(f"{config}: `series_rules`: {exc}") from exc

    def _qc_inputs(self, meta_file: Path) -> list[str]:
        """``qc_inputs`` of the metadata: the input keys the QC picture shows, one row each, as the
        preprocessing leaves them on the reference grid (default: the reference input as loaded)."""
        given = self.metadata.get("qc_inputs") or []
        # a channel the metadata lists but these configs leave out (an override chose a subset) is not shown
        known = [*self.input_keys, *(self.metadata.get("channels") or [])]
        if not isinstance(given, list) or any(key not in known for key in given):
            raise BundleContractError(f"{meta_file}: `qc_inputs` must list input keys among {list(self.input_keys)}, "
                                      f"got {given!r}")
        return [str(key) for key in given if key in self.input_keys]

    def _network_input_key(self, parser, config: Path) -> str:
        key = _optional(parser, "network_input_key")
        if key is None:
            if len(self.input_keys) > 1:
                raise BundleContractError(
                    f"{config}: several input keys {list(self.input_keys)}: define `network_input_key`, the "
                    "preprocessed key the network reads"
                )
            return self.input_keys[0]
        return str(key)

    def _segments(self):
        return segments_from_metadata(self.metadata) if self.metadata.get("dicom_seg_segments") else None

    def describe(self) -> dict:
        """The model's identity for ``record.json``."""
        return {
            "bundle": self.root.name,
            "name": self.name,
            "version": self.version,
            "weights": self.weights_path.name,
            "weights_sha256": self.weights_sha256,
            "bundle_sha256": self.bundle_sha256,
            **({"overrides": self.overrides} if self.overrides else {}),  # as given, after the bundle's configs
            # the model the runtime ran, when not the weights (the runtime: the record's settings)
            **({"int8_model": self.int8.xml.name, "int8_model_sha256": self.int8.sha256} if self.int8 else {}),
        }

    def preprocess(self, inputs: Mapping) -> dict:
        """The loaded inputs (key -> ``(C, *spatial)`` MetaTensor) through the preprocessing."""
        return self.preprocessing(dict(inputs))

    @torch.no_grad()
    def predict(self, data: Mapping) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The label map ``(1, *spatial)`` on the reference input's grid, and the probabilities there
        (``probabilities`` runs only) or None, for preprocessed ``data``."""
        from monai.data import MetaTensor

        image = data[self.network_input_key]
        with torch.inference_mode():
            logits = self.inferer(image.as_tensor()[None].to(self.device), self.runner)
        # out of inference mode (the inverse transforms update tensors in place), on the CPU, with the
        # input's metadata and transform trace, as the evaluator's decollated output has them
        logits = logits[0].float().cpu().clone()
        pred = MetaTensor(logits, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        probabilities = None
        if self.probability_transform is not None:
            probabilities = self.probability_transform({**data, PRED: pred.clone()})[PROB]
            probabilities = torch.as_tensor(probabilities).float()
        labels = self.postprocessing({**data, PRED: pred})[PRED]
        return torch.as_tensor(labels), probabilities
