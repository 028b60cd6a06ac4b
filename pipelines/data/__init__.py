"""Data manifests (MONAI datalists): safe loading, building, checking, splitting by patient."""

from __future__ import annotations

from .manifest import (
    SECTIONS,
    CheckReport,
    build_manifest,
    check_manifest,
    load_manifest,
    manifest_schema,
    read_manifest,
    resolve_path,
    split_manifest,
    write_manifest,
)

__all__ = [
    "SECTIONS",
    "CheckReport",
    "build_manifest",
    "check_manifest",
    "load_manifest",
    "manifest_schema",
    "read_manifest",
    "resolve_path",
    "split_manifest",
    "write_manifest",
]
