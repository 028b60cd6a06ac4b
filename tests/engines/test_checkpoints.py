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
        if stop:
            with pytest.raises(KeyboardInterrupt):
                trainer.run([0, 1, 2], max_epochs=2)
        else:
            trainer.run([0, 1, 2], max_epochs=2)
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
