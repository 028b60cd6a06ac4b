"""MONAI Label integration: the app serving the project's bundles, and its launcher.

:mod:`pipelines.label.server`, :mod:`pipelines.label.compat` and :mod:`pipelines.label.stacking` import in any environment;
:mod:`pipelines.label.app` needs MONAI Label, which lives in its own environment (``.venv-label``,
created by ``make label-server``: MONAI Label 0.8.5 needs pydicom 2).
"""

from pipelines.label.server import MAIN_PY, bundle_names, prepare_app, server_command

__all__ = ["MAIN_PY", "bundle_names", "prepare_app", "server_command"]
