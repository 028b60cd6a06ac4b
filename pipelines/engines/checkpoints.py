"""Resuming an interrupted training run from its last checkpoint."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping

from pipelines.io.writers import atomic_path

__all__ = ["ResumeTraining", "latest_checkpoint"]

logger = logging.getLogger(__name__)


def _checkpoint_step(path: Path, prefix: str = "last") -> int | None:
    """The step in a ``<prefix>_checkpoint_<step>.pt`` file name, or None for other names."""
    match = re.match(rf"^{re.escape(prefix)}_checkpoint_(?:[a-z]+=)?(\d+)\.pt$", Path(path).name)
    return int(match.group(1)) if match else None


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "last") -> Path | None:
    """The newest ``<prefix>_checkpoint_<step>.pt`` that :class:`ResumeTraining` wrote in ``ckpt_dir``
    (highest step), or None. Temporary files of an interrupted save are never matched."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = [(step, p) for p in folder.iterdir() if (step := _checkpoint_step(p, prefix)) is not None and p.is_file()]
    return max(found)[1] if found else None


class ResumeTraining:
    """Save the whole training state every ``interval`` iterations and resume from it after a crash.

    Attach to the trainer. Every ``interval`` iterations, after each epoch's handlers (validation
    included, so the best-score record is current) and at the end it writes
    ``<ckpt_dir>/<prefix>_checkpoint_<iteration>.pt`` (atomically, keeping only the newest) holding
    ``save_dict`` (network, optimizer, scheduler...) and the trainer's own state. On ``STARTED``, if
    such a file exists, it loads it, so the run goes on from the saved iteration and epoch; Ignite
    replays the rest of an interrupted epoch. With ``best_saver`` (the evaluator's key-metric
    ``CheckpointSaver``), its record of the best score is saved and restored too, so a resumed run
    replaces the best model only when it beats it. With ``early_stopper``, its patience counter and
    best score are kept, so a run resumed after a crash stops when the uninterrupted run would have.
    The trainer's AMP gradient scaler (``SupervisedTrainer(amp=True)`` on CUDA) is saved too, so a
    resumed run goes on with the loss scale it had reached instead of re-learning it from 2**16
    through a series of skipped steps. A checkpoint without the early-stopping or scaler state (a
    run that had none) resumes with them fresh, with a warning. With no checkpoint, or
    ``enabled=False``, training starts from scratch (and still saves).

    The trainer is added by ``attach``: a bundle config cannot reference the trainer from inside its
    own handler list.

    Args:
        ckpt_dir: folder for the checkpoints.
        save_dict: objects with ``state_dict``/``load_state_dict``, e.g. ``{"model": net, "optimizer": opt}``.
        interval: iterations between checkpoints.
        prefix: file name prefix.
        best_saver: the key-metric ``CheckpointSaver`` of the evaluator.
        early_stopper: the evaluator's MONAI ``EarlyStopHandler`` or ignite ``EarlyStopping``; an
            ``EarlyStopHandler`` with no trainer yet is given the one this handler is attached to.
        map_location: device for the loaded tensors.
        enabled: False to ignore existing checkpoints.
        save: False to only resume (the ranks other than 0 of a distributed run, which load the
            same checkpoint so every replica starts alike, but leave writing to rank 0).
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        save_dict: Mapping[str, object],
        interval: int = 50,
        prefix: str = "last",
        best_saver=None,
        early_stopper=None,
        map_location: str | torch.device = "cpu",
        enabled: bool = True,
        save: bool = True,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1 iteration, got {interval}")
        if "trainer" in save_dict:
            raise ValueError("save_dict must not hold 'trainer': the engine this handler is attached to is saved")
        self.ckpt_dir = Path(ckpt_dir)
        self.save_dict = dict(save_dict)
        self.interval = interval
        self.prefix = prefix
        if best_saver is not None:
            self.save_dict["best_model_record"] = _KeyMetricRecord(best_saver)
        self.early_stopping = None if early_stopper is None else _EarlyStoppingRecord(early_stopper)
        if self.early_stopping is not None:
            self.save_dict["early_stopping"] = self.early_stopping
        self.map_location = map_location
        self.enabled = enabled
        self.saves = save
        self.resumed_from: Path | None = None

    def attach(self, engine: Engine) -> None:
        self.save_dict["trainer"] = engine
        scaler = getattr(engine, "scaler", None)  # SupervisedTrainer(amp=True) makes one; disabled without CUDA
        if scaler is not None and scaler.is_enabled():
            self.save_dict["grad_scaler"] = scaler
        if self.early_stopping is not None:
            self.early_stopping.give_trainer(engine)
        engine.add_event_handler(Events.STARTED, self.load)
        if self.saves:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self.save)
            engine.add_event_handler(Events.COMPLETED, self.save)

    def save(self, engine: Engine) -> Path:
        """Write the checkpoint of the current iteration (atomically) and delete older ones."""
        path = self.ckpt_dir / f"{self.prefix}_checkpoint_{engine.state.iteration}.pt"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {key: obj.state_dict() for key, obj in self.save_dict.items()}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        for old in self.ckpt_dir.glob(f"{self.prefix}_checkpoint_*.pt"):
            if old != path and _checkpoint_step(old, self.prefix) is not None:
                old.unlink(missing_ok=True)
        logger.info("saved checkpoint %s", path)
        return path

    def load(self, engine: Engine) -> None:
        if self.saves and not engine.has_event_handler(self.save, Events.EPOCH_COMPLETED):
            # registered now, after every handler attached before the run: runs after validation
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        if self.resumed_from is not None or not self.enabled:
            return
        path = latest_checkpoint(self.ckpt_dir, self.prefix)
        if path is None:
            logger.info("no checkpoint in %s: training from scratch", self.ckpt_dir)
            return
        try:
            checkpoint = torch.load(path, map_location=self.map_location, weights_only=False)
        except Exception as exc:  # not written by this handler (the saves are atomic), or another format
            raise ValueError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); delete it to start over") from exc
        missing = sorted(set(self.save_dict) - set(checkpoint) - _STARTS_FRESH)
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {missing}; it was not written by this training config")
        max_epochs = engine.state.max_epochs
        for key, target in self.save_dict.items():
            if key in checkpoint:
                target.load_state_dict(checkpoint[key])
            else:
                logger.warning("%s holds no %s state (the run that wrote it had none): it starts fresh", path, key)
        # the checkpoint holds the interrupted run's max_epochs; the configured one wins
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise ValueError(f"{path}: the checkpoint is at epoch {engine.state.epoch}, beyond max_epochs {max_epochs}")
        engine.state.max_epochs = max_epochs
        self.resumed_from = path
        logger.info("resumed from %s: epoch %d, iteration %d", path, engine.state.epoch, engine.state.iteration)


# state a resumed run may lack without harm: the run that wrote the checkpoint had no AMP or early stopping
_STARTS_FRESH = frozenset({"grad_scaler", "early_stopping"})


class _EarlyStoppingRecord:
    """The patience counter and best score of an early-stopping handler, as a checkpointable object."""

    def __init__(self, stopper) -> None:
        if not (isinstance(stopper, EarlyStopping) or hasattr(stopper, "set_trainer")):
            raise TypeError(
                f"early_stopper must be an EarlyStopHandler or ignite EarlyStopping, got {type(stopper).__name__}")
        self.stopper = stopper

    def give_trainer(self, trainer: Engine) -> None:
        if not isinstance(self.stopper, EarlyStopping) and self.stopper._handler is None:
            self.stopper.set_trainer(trainer)

    @property
    def _ignite(self) -> EarlyStopping:
        # MONAI's EarlyStopHandler makes its ignite handler anew in each set_trainer: look it up each time
        return self.stopper if isinstance(self.stopper, EarlyStopping) else self.stopper._handler

    def state_dict(self) -> dict:
        return dict(self._ignite.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self._ignite.load_state_dict(state)


class _KeyMetricRecord:
    """The best-score record of a key-metric ``CheckpointSaver``, as a checkpointable object."""

    def __init__(self, saver) -> None:
        if getattr(saver, "_key_metric_checkpoint", None) is None:
            raise ValueError("best_saver must be a CheckpointSaver with save_key_metric=True")
        self.saver = saver

    def state_dict(self) -> dict:
        return self.saver._key_metric_checkpoint.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.saver.load_state_dict(state)
