"""Shared fixtures: the shared data folder, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# the batch job's patient and study hashes use the site's salt: the tests' own, not a file in ~/.config
os.environ.setdefault("UNET_PIPELINES_SALT", "unet-pipelines tests")


def shared_data_dir() -> Path:
    """``$UNET_SHARED_DATA``, by default ``../shared/data`` beside the repository."""
    return Path(os.environ.get("UNET_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def isbi_dir() -> Path:
    path = shared_data_dir() / "isbi2012"
    if not (path / "train" / "image" / "0.png").is_file():
        pytest.skip(f"ISBI 2012 data not found at {path} (set UNET_SHARED_DATA to the shared data folder)")
    return path
