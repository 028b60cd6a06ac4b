"""A multi-parametric bundle in MONAI Label: one multi-channel image per case instead of a channel
per key. Kept apart from :mod:`pipelines.label.app` (which imports MONAI Label) so it can be tested
in the project's environment."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["CheckChannels", "fitting_datalist", "image_layout", "stacked_channels", "stacked_training_transforms"]


class CheckChannels:
    """Refuse an image whose channel count is not the bundle's (``(C, *spatial)``), naming its file."""

    def __init__(self, key: str, names: Sequence[str]) -> None:
        self.key, self.names = key, list(names)

    def __call__(self, data: dict) -> dict:
        image = data[self.key]
        if image.shape[0] != len(self.names):
            source = getattr(image, "meta", {}).get("filename_or_obj", self.key)
            raise ValueError(f"{source}: the bundle takes {len(self.names)} channels ({', '.join(self.names)}), "
                             f"one multi-channel image in that order; this one has {image.shape[0]}")
        return data


def stacked_channels(transforms: list, image_key: str = "image") -> list:
    """A bundle's preprocessing for one multi-channel image under ``image_key``.

    A multi-parametric bundle loads each channel under its own key (series of a DICOM study, each
    found by its rules; files of a BraTS case), aligns them and stacks them into ``image_key``
    (``ConcatItemsd``). MONAI Label sends one image per case: here a file holding the channels in
    the bundle's order (a 4D NIfTI), so everything up to the stacking is replaced by loading that
    file and checking its channel count. Other preprocessing is returned as it is.
    """
    from pipelines.transforms import LoadVolumed

    keys = [str(k) for k in getattr(transforms[0], "keys", ())] if transforms else []
    stack = next((i for i, t in enumerate(transforms)
                  if type(t).__name__ == "ConcatItemsd" and getattr(t, "name", None) == image_key), None)
    if len(keys) < 2 or stack is None:
        return transforms
    rest = [t for t in transforms[stack + 1:]
            if not (type(t).__name__ == "DeleteItemsd" and set(map(str, t.keys)) <= set(keys))]
    return [LoadVolumed(image_key), CheckChannels(image_key, keys), *rest]


def stacked_training_transforms(config: list, channels: Sequence[str], image_key: str = "image") -> list | None:
    """``deterministic_transforms`` of a ``train.json`` (its raw config items) for MONAI Label's
    datalist of one multi-channel ``image`` and a ``label`` per case, as :func:`stacked_channels`
    does for inference; None for a bundle that does not stack channels."""
    stack = next((i for i, item in enumerate(config) if isinstance(item, dict)
                  and str(item.get("_target_", "")).endswith("ConcatItemsd") and item.get("name") == image_key), None)
    if stack is None or len(channels) < 2:
        return None
    rest = [item for item in config[stack + 1:]
            if not (isinstance(item, dict) and str(item.get("_target_", "")).endswith("DeleteItemsd"))]
    return [{"_target_": "pipelines.transforms.LoadVolumed", "keys": [image_key, "label"]}, *rest]


def image_layout(path: str) -> tuple[int, int] | None:
    """``(spatial dimensions, channels)`` of an image file from its header, as a bundle would load it:
    a 4D NIfTI is a 3D image with a channel per volume, an RGB picture a 2D image of 3 channels,
    a folder a DICOM series (3D, one channel). None when the header cannot be read (the bundle's
    loader then names the problem)."""
    if Path(path).is_dir():
        return 3, 1
    import SimpleITK

    reader = SimpleITK.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    dims, size, components = reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents()
    if dims == 4:
        return 3, size[3] * components
    if dims == 3 and size[2] == 1 and Path(path).suffix.lower() in {".png", ".tif", ".tiff", ".jpg", ".jpeg"}:
        return 2, components  # a picture read as a one-slice volume
    return dims, components


def fitting_datalist(datalist: list[dict], spatial_dims: int, channels: int, bundle: str) -> list[dict]:
    """The cases of MONAI Label's datalist whose image a bundle takes (``spatial_dims``, ``channels``).

    One server's datastore holds the images of every bundle it serves (single series, four-channel
    stacks, EM sections); MONAI Label trains a bundle on every labelled image of it. Images of
    another layout are left out, each named in the log; an image whose header cannot be read stays
    (the bundle's loader names what is wrong with it).

    Raises:
        ValueError: no labelled image fits, naming the bundle and what each image is.
    """
    kept, skipped = [], []
    for item in datalist:
        layout = image_layout(item["image"])
        if layout is None or layout == (spatial_dims, channels):
            kept.append(item)
        else:
            skipped.append(f"{item['image']} ({layout[0]}D, {layout[1]} channel{'s' * (layout[1] != 1)})")
    if skipped:
        logger.warning("%s takes %dD images of %d channel%s: %d labelled image%s left out of training: %s",
                       bundle, spatial_dims, channels, "s" * (channels != 1), len(skipped),
                       "s" * (len(skipped) != 1), "; ".join(skipped))
    if datalist and not kept:
        raise ValueError(f"{bundle}: none of the {len(datalist)} labelled images is a {spatial_dims}D image of "
                         f"{channels} channel{'s' * (channels != 1)}: " + "; ".join(skipped))
    return kept
