"""Content hashes of files and folders: what identifies an input, a bundle or weights."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["content_hash"]


def content_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of every file under a folder (relative names and bytes, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
