"""Loading transforms for bundle configs: ``LoadVolume`` and its dictionary wrapper ``LoadVolumed``."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from pipelines.io.grid import check_same_grid

__all__ = ["LoadVolume", "LoadVolumed"]


class LoadVolume(Transform):
    """Load a path with :func:`pipelines.io.load_volume`: ``(C, X, Y, Z)`` MetaTensor, RAS affine.

    Args:
        rules: DICOM series selection (a :class:`pipelines.io.SeriesRules` or a mapping of its fields).
        options: DICOM series rules one by one (``modality``, ``description``, ..., ``volume``: the
            fields of :class:`~pipelines.io.SeriesRules`), and ``strict``, ``allow_nonfinite``,
            ``allow_blank``, ``max_voxels``, ``dtype`` as :func:`pipelines.io.load_volume` takes them.
    """

    _LOAD_OPTIONS = ("strict", "allow_nonfinite", "allow_blank", "max_voxels", "dtype")

    def __init__(self, rules=None, **options) -> None:
        from pipelines.io import SeriesRules  # checked now, not at the first case

        rule_options = {k: v for k, v in options.items() if k not in self._LOAD_OPTIONS}
        unknown = set(rule_options) - set(SeriesRules.names())
        if unknown:
            raise TypeError(f"LoadVolume got unknown option(s) {sorted(unknown)}")
        self.rules = SeriesRules.of(rules, **rule_options)
        self.options = {k: v for k, v in options.items() if k in self._LOAD_OPTIONS}

    def __call__(self, path):
        from pipelines.io import load_volume

        return load_volume(path, self.rules, **self.options)


class LoadVolumed(MapTransform):
    """Dictionary wrapper of :class:`LoadVolume`.

    ``rules``, ``options``: see :class:`LoadVolume`.

    Args:
        keys: keys holding paths, e.g. ``["image", "label"]``.
        check_grid: every loaded key must share the first key's grid (shape and affine within
            1 micrometre), else :class:`pipelines.io.GridMismatchError` names both files.
        allow_missing_keys: skip missing keys instead of raising.
        key_rules: series rules of single keys (key -> rules or a mapping of their fields), merged
            over ``rules`` for that key: the channels of one study folder, each found by its own
            rules (a bundle's ``series_rules``); keys not loaded are ignored (the rules of every
            channel a bundle knows, with a subset of them asked for).
    """

    def __init__(self, keys: KeysCollection, check_grid: bool = True, allow_missing_keys: bool = False, rules=None,
                 key_rules: Mapping[str, object] | None = None, **options) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadVolume(rules, **options)
        loaded = {str(k) for k in self.keys}
        self.loaders = {
            key: LoadVolume(own if not isinstance(own, Mapping) else self.loader.rules.of(self.loader.rules, **own),
                            **self.loader.options)
            for key, own in (key_rules or {}).items() if key in loaded
        }
        self.check_grid = check_grid

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        reference_key = None
        for key in self.key_iterator(d):
            d[key] = self.loaders.get(str(key), self.loader)(d[key])
            if reference_key is None:
                reference_key = key
            elif self.check_grid:
                check_same_grid(d[reference_key], d[key], str(reference_key), str(key))
        return d
