"""A bundle loaded once for a batch run: network, preprocessing, inferer, labels, hashes.

A bundle is code: its configs evaluate Python expressions when parsed. Run only bundles you trust.
The weights themselves load with ``torch.load(..., weights_only=True)`` (no pickled code).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["BundleModel", "bundle_hash"]


def bundle_hash(bundle_dir: str | os.PathLike, weights: str | os.PathLike | None = None) -> str:
    """SHA-256 of what inference uses of a bundle: its ``configs`` folder (relative names and contents)
    and the weights file (default ``models/model.pt``).

    Other files in ``models/`` (a training run's ``last_checkpoint_*.pt``, exports) are left out: they
    do not change the results, and a training run next to a batch job must not make its rerun redo
    every case (nor cost a read of gigabytes of checkpoints at each start).
    """
    from pipelines.io.hashing import content_hash

    root = Path(bundle_dir)
    weights_path = Path(weights) if weights else root / "models" / "model.pt"
    return _bundle_digest(root, content_hash(weights_path) if weights_path.exists() else "")


def _bundle_digest(root: Path, weights_sha256: str) -> str:
    """:func:`bundle_hash` from the weights' SHA-256 already computed."""
    from pipelines.io.hashing import content_hash

    configs = root / "configs"
    parts = [content_hash(configs) if configs.exists() else "", weights_sha256]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class BundleModel:
    """The inference parts of a bundle's ``configs/inference.json``.

    Uses the config ids ``network_def``, ``preprocessing`` (its :class:`pipelines.transforms.LoadVolumed`
    is left out: the batch job loads volumes itself), ``inferer``, optional ``series_rules`` (DICOM
    series selection) and ``tta_axes``; labels and DICOM SEG codes come from ``metadata.json``.

    Args:
        bundle_dir: the bundle folder.
        device: where the network runs.
        weights: weights file (default ``models/model.pt``): a state dict, or a checkpoint holding
            one under ``model``.
        tta: mirror test-time augmentation over the bundle's ``tta_axes`` (all spatial axes if unset).
    """

    def __init__(self, bundle_dir: str | os.PathLike, device: str | torch.device = "cpu",
                 weights: str | os.PathLike | None = None, tta: bool = False) -> None:
        from monai.bundle import ConfigParser
        from monai.transforms import Compose

        from pipelines.io.hashing import content_hash
        from pipelines.transforms import LoadVolumed

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
        parser["bundle_root"] = str(self.root)
        parser["device"] = f"$torch.device('{self.device}')"
        if tta:
            axes = parser.get("tta_axes")
            parser["inferer#tta_axes"] = axes if axes else list(range(len(parser.get("patch_size") or [0, 0, 0])))
        self.metadata: dict = json.loads(meta_file.read_text())
        self.name = str(self.metadata.get("name", self.root.name))
        self.version = str(self.metadata.get("version", ""))
        self.series_rules: dict = dict(parser.get("series_rules") or {})
        self.network = parser.get_parsed_content("network_def").to(self.device).eval()
        self.weights_path = Path(weights) if weights else self.root / "models" / "model.pt"
        if not self.weights_path.is_file():
            raise FileNotFoundError(f"{self.weights_path}: bundle weights not found")
        state = torch.load(self.weights_path, map_location=self.device, weights_only=True)
        if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]
        self.network.load_state_dict(state)
        self.weights_sha256 = content_hash(self.weights_path)
        self.bundle_sha256 = _bundle_digest(self.root, self.weights_sha256)  # the weights are read once
        preprocessing = parser.get_parsed_content("preprocessing")
        self.preprocessing = Compose([t for t in preprocessing.transforms if not isinstance(t, LoadVolumed)])
        self.inferer = parser.get_parsed_content("inferer")
        self.labels = self._labels()
        self.segments = self._segments()

    def _labels(self) -> dict[int, str]:
        """Label value -> name, from the output's ``channel_def`` (background left out)."""
        outputs = self.metadata.get("network_data_format", {}).get("outputs", {})
        channel_def = next(iter(outputs.values()), {}).get("channel_def", {}) if outputs else {}
        labels = {int(k): str(v) for k, v in channel_def.items() if int(k) != 0}
        if not labels:
            raise ValueError(f"{self.root}: metadata.json has no output channel_def naming the labels")
        return labels

    def _segments(self):
        from pipelines.io.dicom_seg import segments_from_metadata

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
        }

    def preprocess(self, image):
        """A loaded volume ``(C, *spatial)`` MetaTensor -> the network input, with its transform trace."""
        return self.preprocessing({"image": image})["image"]

    @torch.no_grad()
    def predict(self, image, probabilities: bool = False):
        """Label map ``(1, *spatial)`` uint8 on the grid of the volume ``image`` was preprocessed from,
        and the class probabilities ``(C, *spatial)`` float32 there when asked (else None)."""
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        with torch.inference_mode():
            logits = self.inferer(image.as_tensor()[None].to(self.device), self.network)
            scores = torch.softmax(logits.float(), dim=1)[0].cpu()
        scores = scores.clone()  # leave inference mode: the inverse transforms update tensors in place
        keys = ["pred"]
        data = {"image": image, "pred": MetaTensor(scores.argmax(0, keepdim=True).to(torch.uint8), meta=dict(image.meta),
                                                    applied_operations=list(image.applied_operations))}
        if probabilities:
            data["prob"] = MetaTensor(scores, meta=dict(image.meta), applied_operations=list(image.applied_operations))
            keys.append("prob")
        inverted = Invertd(keys=keys, transform=self.preprocessing, orig_keys="image",
                           nearest_interp=[True, False][: len(keys)], to_tensor=True)(data)
        labels = inverted["pred"].as_tensor().round().to(torch.uint8)
        probs = None
        if probabilities:
            probs = inverted["prob"].as_tensor().float()
            # outside the foreground crop the inverse pads zeros: that is background, certainly
            probs[0] += (1.0 - probs.sum(0)).clamp_(min=0.0)
        return labels, probs
