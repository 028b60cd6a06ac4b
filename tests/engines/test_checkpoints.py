from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

from pipelines.engines import ResumeTraining, latest_checkpoint


def make_trainer(seen: list, stop_at: int | None = None):
    """A trainer of a 1-parameter model whose steps record the iteration and move the weight by 1."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def step(engine, batch):
        seen.append(engine.state.iteration)
        optimizer.zero_grad()
        (-model.weight.sum()).backward()  # gradient -1: each SGD step adds 1
        optimizer.step()
        if stop_at is not None and engine.state.iteration == stop_at:
            raise KeyboardInterrupt  # a crash that leaves only the checkpoints on disk

    return Engine(step), model, optimizer


def run_crashing(trainer: Engine, data: list, max_epochs: int, crashes: bool) -> None:
    """Run the trainer; when ``crashes``, its step raises KeyboardInterrupt, which is expected."""
    if crashes:
        with pytest.raises(KeyboardInterrupt):
            trainer.run(data, max_epochs=max_epochs)
    else:
        trainer.run(data, max_epochs=max_epochs)


def test_latest_checkpoint_picks_the_highest_step(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    for name in ("last_checkpoint_9.pt", "last_checkpoint_12.pt", "last_checkpoint_final.pt", ".last_checkpoint_40.pt.tmp",
                 "model.pt", "other_checkpoint_99.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert latest_checkpoint(tmp_path).name == "last_checkpoint_12.pt"


def test_interrupted_run_resumes_from_the_last_checkpoint_mid_epoch(tmp_path):
    data = list(range(5))  # epoch length 5
    seen: list[int] = []
    trainer, model, optimizer = make_trainer(seen, stop_at=8)
    ResumeTraining(tmp_path, {"model": model, "optimizer": optimizer}, interval=3).attach(trainer)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(data, max_epochs=3)
    assert latest_checkpoint(tmp_path).name == "last_checkpoint_6.pt"  # the previous one (3) is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint_6.pt"]

    seen2: list[int] = []
    trainer2, model2, optimizer2 = make_trainer(seen2)
    resume = ResumeTraining(tmp_path, {"model": model2, "optimizer": optimizer2}, interval=3)
    resume.attach(trainer2)
    trainer2.run(data, max_epochs=3)
    assert resume.resumed_from.name == "last_checkpoint_6.pt"
    assert seen2 == list(range(7, 16))  # iterations 7..15: the rest of epoch 2, then epoch 3
    assert trainer2.state.epoch == 3 and model2.weight.item() == 15.0  # 6 restored steps + 9 new ones
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint_15.pt"]


def test_disabled_resume_starts_over_and_ranks_that_do_not_save(tmp_path):
    seen: list[int] = []
    trainer, model, optimizer = make_trainer(seen)
    ResumeTraining(tmp_path, {"model": model}, interval=2).attach(trainer)
    trainer.run([0, 1], max_epochs=2)
    seen2: list[int] = []
    trainer2, model2, _ = make_trainer(seen2)
    ResumeTraining(tmp_path, {"model": model2}, interval=2, enabled=False, save=False).attach(trainer2)
    trainer2.run([0, 1], max_epochs=1)
    assert seen2 == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint_4.pt"]  # nothing new written


def test_best_model_record_survives_a_resume(tmp_path):
    """A resumed run keeps the best score so far: a worse validation must not replace model.pt."""
    scores = iter([0.9, 0.5])

    def run(stop: bool) -> CheckpointSaver:
        seen: list[int] = []
        trainer, model, optimizer = make_trainer(seen, stop_at=4 if stop else None)
        evaluator = Engine(lambda e, b: None)

        @evaluator.on(Events.EPOCH_COMPLETED)
        def score(engine):
            engine.state.metrics["dice"] = next(scores)

        evaluator.state.key_metric_name = "dice"
        best = CheckpointSaver(str(tmp_path), {"model": model}, save_key_metric=True, key_metric_name="dice",
                               key_metric_filename="model.pt")
        best.attach(evaluator)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
        ResumeTraining(tmp_path, {"model": model}, interval=1, best_saver=best).attach(trainer)
        run_crashing(trainer, [0, 1, 2], max_epochs=2, crashes=stop)
        return best

    run(stop=True)  # epoch 1 validated at 0.9 (model.pt written after 3 steps), crash at iteration 4
    first = torch.load(tmp_path / "model.pt", weights_only=True)
    assert first["weight"].item() == 3.0
    run(stop=False)  # epoch 2 validates at 0.5: worse, model.pt stays
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == 3.0


def test_bad_input_is_refused_clearly(tmp_path):
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="interval"):
        ResumeTraining(tmp_path, {"model": model}, interval=0)
    with pytest.raises(ValueError, match="trainer"):
        ResumeTraining(tmp_path, {"trainer": model})
    (tmp_path / "last_checkpoint_5.pt").write_bytes(b"not a checkpoint")
    trainer, model, _ = make_trainer([])
    ResumeTraining(tmp_path, {"model": model}).attach(trainer)
    with pytest.raises(ValueError, match="last_checkpoint_5.pt: unreadable checkpoint"):
        trainer.run([0], max_epochs=1)
    torch.save({"model": model.state_dict()}, tmp_path / "last_checkpoint_6.pt")  # no trainer state
    trainer, model, _ = make_trainer([])
    ResumeTraining(tmp_path, {"model": model}).attach(trainer)
    with pytest.raises(ValueError, match=r"last_checkpoint_6.pt: checkpoint lacks \['trainer'\]"):
        trainer.run([0], max_epochs=1)


def test_amp_loss_scale_survives_a_resume(tmp_path):
    """The trainer's GradScaler goes on from the scale it reached, not from its initial one."""

    def run(stop: bool):
        model = torch.nn.Linear(1, 1, bias=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)  # doubles every step

        def step(engine, batch):
            optimizer.zero_grad()
            scaler.scale(model(torch.ones(1, 1)).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
            if stop and engine.state.iteration == 3:
                raise KeyboardInterrupt

        trainer = Engine(step)
        trainer.scaler = scaler  # where SupervisedTrainer keeps it
        ResumeTraining(tmp_path, {"model": model}, interval=2).attach(trainer)
        run_crashing(trainer, [0, 1, 2], max_epochs=2, crashes=stop)
        return scaler

    run(stop=True)  # checkpoint at iteration 2: scale 2**6
    assert torch.load(tmp_path / "last_checkpoint_2.pt", weights_only=False)["grad_scaler"]["scale"] == 2.0**6
    assert run(stop=False).get_scale() == 2.0**10  # iterations 3..6 from 2**6; a fresh scaler would reach 2**8


@pytest.mark.parametrize("kind", ["monai", "ignite"])
def test_early_stopping_patience_survives_a_resume(tmp_path, kind):
    """Patience 2, scores 0.9 then 0.5 (crash) then 0.4: the resumed run stops after 0.4, the second
    non-improving score, as the uninterrupted run would; a fresh counter would go on to epoch 4."""
    from ignite.handlers import EarlyStopping
    from monai.handlers import EarlyStopHandler

    scores = iter([0.9, 0.5, 0.4, 0.3, 0.2])

    def run(stop: bool) -> Engine:
        trainer, model, _ = make_trainer([], stop_at=7 if stop else None)
        evaluator = Engine(lambda e, b: None)
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(dice=next(scores)))
        if kind == "monai":
            stopper = EarlyStopHandler(patience=2, score_function=lambda e: e.state.metrics["dice"])
        else:
            stopper = EarlyStopping(patience=2, score_function=lambda e: e.state.metrics["dice"], trainer=trainer)
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, stopper)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
        ResumeTraining(tmp_path, {"model": model}, interval=100, early_stopper=stopper).attach(trainer)
        run_crashing(trainer, [0, 1, 2], max_epochs=5, crashes=stop)
        return trainer

    run(stop=True)  # epochs 1 (0.9) and 2 (0.5, counter 1) validated and saved; crash in epoch 3
    assert torch.load(tmp_path / "last_checkpoint_6.pt", weights_only=False)["early_stopping"]["counter"] == 1
    trainer = run(stop=False)
    assert trainer.state.epoch == 3 and trainer.should_terminate


def test_a_checkpoint_without_scaler_or_early_stopping_state_resumes_them_fresh(tmp_path, caplog):
    from monai.handlers import EarlyStopHandler

    trainer, model, _ = make_trainer([])
    ResumeTraining(tmp_path, {"model": model}, interval=2).attach(trainer)
    trainer.run([0, 1], max_epochs=1)  # no AMP, no early stopping
    trainer, model, _ = make_trainer([])
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    stopper = EarlyStopHandler(patience=2, score_function=lambda e: 0.0)
    ResumeTraining(tmp_path, {"model": model}, early_stopper=stopper).attach(trainer)
    assert stopper._handler is not None and stopper._handler.trainer is trainer  # given the trainer by attach
    with caplog.at_level("WARNING", logger="pipelines.engines.checkpoints"):
        trainer.run([0, 1], max_epochs=2)
    assert trainer.state.iteration == 4 and trainer.scaler.get_scale() == 8.0
    assert "holds no grad_scaler state" in caplog.text and "holds no early_stopping state" in caplog.text
    with pytest.raises(TypeError, match="early_stopper must be"):
        ResumeTraining(tmp_path, {"model": model}, early_stopper=object())
