"""MLflow tracking that never stops a training run, and logs every hyperparameter.

``monai.bundle run ... --tracking mlflow`` adds MONAI's ``MLFlowHandler`` to the trainer's and the
evaluator's handler lists. A bundle passes those lists through :func:`tracked_handlers`, which
makes each MLflow handler fail soft: if the tracking server stops (or the store is unwritable) the
handler logs one warning, stops tracking for the rest of the run, and training goes on. For HTTP
tracking URIs it also caps MLflow's request retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 2,
``MLFLOW_HTTP_REQUEST_TIMEOUT`` 10 s, unless set in the environment) so a dead server costs
seconds, not MLflow's default of minutes per call.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence

__all__ = ["flatten_params", "tracked_handlers"]

logger = logging.getLogger(__name__)

_GUARDED = ("start", "iteration_completed", "epoch_completed", "complete", "close")
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def flatten_params(params: Mapping, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": "1", "c": "[1, 2]"}``: MLflow parameters are flat text."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(list(value) if isinstance(value, tuple) else value)[:6000]
    return flat


def tracked_handlers(
    handlers: Sequence | None,
    params: Mapping | None = None,
    artifacts: Sequence[str | os.PathLike] = (),
) -> list:
    """The handler list with every ``MLFlowHandler`` in it made fail-soft.

    Args:
        handlers: an engine's handlers (``train#handlers`` after ``--tracking mlflow`` patched it).
        params: hyperparameters logged at the start of the run (nested dicts are flattened).
        artifacts: files or folders logged when the run completes (the best model, overlay PNGs), in
            addition to the executed config MONAI's settings log.
    """
    from monai.handlers import MLFlowHandler

    handlers = [h for h in (handlers or []) if h is not None]  # disabled components resolve to None
    for handler in handlers:
        if not isinstance(handler, MLFlowHandler) or getattr(handler, "_fail_soft", False):
            continue
        uri = os.environ.get("MLFLOW_TRACKING_URI") or handler.client.tracking_uri or ""
        if uri.startswith(("http://", "https://")):
            for name, value in _HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
        if params:
            handler.experiment_param = {**(handler.experiment_param or {}), **flatten_params(params)}
        handler.artifacts = tuple(_repair_path(a) for a in (*handler.artifacts, *artifacts) if a)
        handler._fail_soft, handler._tracking_failed = True, False
        for name in _GUARDED:
            setattr(handler, name, _guard(handler, getattr(handler, name), uri))
    return handlers


def _repair_path(path) -> str:
    """Undo MONAI 1.6's executed-config path when ``output_dir`` was overridden with a plain path.

    ``--tracking mlflow`` sets ``save_execute_config`` to ``output_dir + " + '/config_<time>.json'"``,
    which is an expression only when ``output_dir`` is one; with ``--output_dir /some/dir`` it is
    the literal text ``/some/dir + '/config_<time>.json'`` and the config is never logged.
    """
    text = str(path)
    match = re.fullmatch(r"(.+) \+ '(/[^']+)'", text)
    return match.group(1) + match.group(2) if match and not os.path.exists(text) else text


def _guard(handler, method, uri: str):
    @functools.wraps(method)
    def guarded(*args, **kwargs):
        if handler._tracking_failed:
            return None
        try:
            return method(*args, **kwargs)
        except Exception as exc:  # any MLflow or network failure: tracking is optional, training is not
            handler._tracking_failed = True
            logger.warning(
                "MLflow tracking at %s failed in %s (%s: %s); training continues without tracking",
                uri, method.__name__, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
            )
            return None

    return guarded
