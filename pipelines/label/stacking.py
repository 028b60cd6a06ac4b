"""A multi-parametric bundle in MONAI Label: one multi-channel image per case instead of a channel
per key. Kept apart from :mod:`pipelines.label.app` (which imports MONAI Label) so it can be tested
in the project's environment."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CheckChannels", "stacked_channels", "stacked_training_transforms"]


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
