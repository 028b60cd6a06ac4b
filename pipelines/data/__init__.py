"""Data manifests (MONAI datalists): safe loading, building, checking, splitting by patient."""

from __future__ import annotations

from .brats import BRATS_CHANNELS, build_brats_manifest
from .manifest import (
    SECTIONS,
    CheckReport,
    build_manifest,
    bundle_default,
    check_manifest,
    image_hash,
    load_manifest,
    manifest_schema,
    read_manifest,
    resolve_path,
    split_manifest,
    write_manifest,
)

__all__ = [
    "BRATS_CHANNELS",
    "SECTIONS",
    "CheckReport",
    "build_brats_manifest",
    "build_manifest",
    "bundle_default",
    "check_manifest",
    "image_hash",
    "load_manifest",
    "manifest_schema",
    "read_manifest",
    "resolve_path",
    "split_manifest",
    "write_manifest",
]
