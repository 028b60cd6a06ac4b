"""Prepare the MONAI Label app folder and start the server on loopback (``unet-pipelines label-server``).

The app folder holds ``main.py`` (it imports :class:`pipelines.label.app.UNetPipelinesApp`), a copy
of each bundle under ``model/<bundle name>`` and what MONAI Label writes at run time (``logs/``,
``bin/``). Bundles are copied, not served in place: training from annotations rewrites
``models/model.pt``, and the repository's shipped weights must stay as they are. A copy is made
once; later starts keep it, with any retrained weights, unless ``refresh`` asks for a new copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pipelines.io.writers import atomic_path

__all__ = ["MAIN_PY", "bundle_names", "prepare_app", "server_command"]

logger = logging.getLogger(__name__)

MAIN_PY = '''"""MONAI Label app of unet-pipelines, written by `unet-pipelines label-server`; see pipelines/label/app.py."""

from pipelines.label.app import UNetPipelinesApp  # noqa: F401
'''
# run outputs and resumable checkpoints stay out of the served copy
_NOT_COPIED = shutil.ignore_patterns("eval", "last_checkpoint_*.pt", ".*.tmp", "__pycache__")


def bundle_names(folder: str | os.PathLike) -> list[str]:
    """Sorted names of the bundles (sub-folders with ``configs/metadata.json``) in ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir() if (p / "configs" / "metadata.json").is_file())


def prepare_app(
    app_dir: str | os.PathLike,
    bundles_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
    refresh: bool = False,
) -> list[Path]:
    """Write ``<app_dir>/main.py`` and copy bundles into ``<app_dir>/model``; returns the served bundle folders.

    Args:
        app_dir: the app folder (created).
        bundles_dir: folder of bundles (each with ``configs/metadata.json`` and ``models/model.pt``).
        names: bundles to serve (default: every bundle in ``bundles_dir``).
        refresh: replace existing copies (and so any weights retrained in them) with new ones.
    """
    app_dir, bundles_dir = Path(app_dir), Path(bundles_dir)
    if not bundles_dir.is_dir():
        raise ValueError(f"bundles folder {bundles_dir} does not exist")
    available = bundle_names(bundles_dir)
    names = list(names) if names else available
    for name in names:
        source = bundles_dir / name
        if name not in available:
            raise ValueError(f"{source} is not a bundle (no configs/metadata.json); bundles there: {available}")
        if not (source / "models" / "model.pt").is_file():
            raise ValueError(f"{source / 'models' / 'model.pt'}: the bundle has no weights to serve")
    model_dir = app_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(app_dir / "main.py") as tmp:
        tmp.write_text(MAIN_PY)
    served = []
    for name in names:
        target = model_dir / name
        if target.exists() and not refresh:
            logger.info("serving the existing copy %s (refresh to copy %s again)", target, bundles_dir / name)
        else:
            staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{name}."))
            shutil.copytree(bundles_dir / name, staging / name, ignore=_NOT_COPIED)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
            staging.rmdir()
            logger.info("copied %s to %s", bundles_dir / name, target)
        served.append(target)
    for stale in model_dir.iterdir():  # served copies not asked for this time are left alone, but not served
        if stale.is_dir() and not stale.name.startswith(".") and stale.name not in names:
            logger.info("not serving %s (not asked for)", stale)
    return served


def server_command(
    app_dir: str | os.PathLike,
    studies: str,
    port: int,
    names: Sequence[str],
    host: str = "127.0.0.1",
    runtime: str | None = None,
) -> list[str]:
    """The ``monailabel start_server`` command line, on loopback unless ``host`` says otherwise.

    The app serves the bundle copies in ``<app_dir>/model`` only; unlike MONAI Label's sample bundle
    app it has no model-zoo source and no SAM2 model, so nothing is fetched at start. ``runtime``
    (``--conf runtime``): where every served bundle's network runs on the CPU, over its ``runtime``
    config id (:mod:`pipelines.inference.runtimes`).
    """
    return [
        sys.executable, "-m", "monailabel.main", "start_server",
        "--app", str(app_dir), "--studies", str(studies), "--host", host, "--port", str(port),
        "--conf", "models", ",".join(names), *(("--conf", "runtime", runtime) if runtime else ()),
    ]
