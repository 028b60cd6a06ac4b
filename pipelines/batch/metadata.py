"""What the batch job reads of a bundle's ``configs/metadata.json`` beyond MONAI's keys, checked: a
malformed value is a :class:`~pipelines.batch.errors.BundleContractError` naming the key and the file
(the keys: docs/reference/metadata.md)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pipelines.batch.errors import BundleContractError

__all__ = ["label_names", "label_values", "lesion_scoring"]


def label_names(metadata: Mapping, meta_file: Path) -> dict[int, str]:
    """Label value -> name: ``labels``, else the output's ``channel_def`` without channel 0."""
    given = metadata.get("labels")
    if given is None:
        outputs = metadata.get("network_data_format", {}).get("outputs", {})
        channel_def = next(iter(outputs.values()), {}).get("channel_def", {}) if outputs else {}
        given = {k: v for k, v in channel_def.items() if int(k) != 0}
    labels = {int(k): str(v) for k, v in given.items() if int(k) != 0}
    if not labels:
        raise BundleContractError(f"{meta_file}: names no labels (`labels`, or an output `channel_def`)")
    return labels


def lesion_scoring(metadata: Mapping, meta_file: Path) -> dict:
    """``lesion_scoring``: the lesion-wise scores' ``dilation`` (a whole number >= 0) and
    ``min_lesion_mm3`` (>= 0); absent ones keep the BraTS glioma values (3 and 50)."""
    given = metadata.get("lesion_scoring") or {}
    allowed = {"dilation": int, "min_lesion_mm3": (int, float)}
    if not isinstance(given, Mapping) or set(given) - set(allowed) or any(
            isinstance(v, bool) or not isinstance(v, allowed[k]) or v < 0 for k, v in given.items()):
        raise BundleContractError(
            f"{meta_file}: `lesion_scoring` must map dilation (a whole number >= 0) and min_lesion_mm3 "
            f"(a number >= 0), got {given!r}"
        )
    return dict(given)


def label_values(metadata: Mapping, key: str, labels: Mapping[int, str], meta_file: Path,
                 within: str | None = None) -> list[int] | None:
    """A list of the bundle's label values under ``key`` (or under ``key.within``): ``lesion_labels``,
    the labels whose connected components are the lesions counted and measured; ``rano.enhancing``,
    the labels of enhancing tumor measured by RANO. None when the metadata has no ``key``."""
    given = metadata.get(key)
    if given is None:
        return None
    values = given.get(within) if within and isinstance(given, Mapping) else (None if within else given)
    if not isinstance(values, list) or not values or any(
            isinstance(v, bool) or not isinstance(v, int) or v not in labels for v in values):
        shape = f'{{"{within}": [...]}}' if within else "a list"
        raise BundleContractError(
            f"{meta_file}: `{key}` must be {shape} of label values among {sorted(labels)}, got {given!r}")
    return list(values)
