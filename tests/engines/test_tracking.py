from __future__ import annotations

import logging

import mlflow
import pytest
from ignite.engine import Engine
from monai.handlers import MLFlowHandler, StatsHandler

from pipelines.engines import flatten_params, tracked_handlers


def test_flatten_params():
    assert flatten_params({"lr": 0.001, "net": {"features": (16, 32), "norm": "instance"}, "tta": None}) == {
        "lr": "0.001", "net.features": "[16, 32]", "net.norm": "instance", "tta": "None",
    }


def run_with(handler, iterations: int = 3) -> Engine:
    engine = Engine(lambda e, b: {"loss": 0.5 / e.state.iteration})
    handler.attach(engine)
    engine.run(range(iterations), max_epochs=2)
    return engine


def test_params_and_artifacts_reach_the_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    (overlays / "epoch_001_case.png").write_bytes(b"png")
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="t", output_transform=lambda out: out["loss"],
                            close_on_complete=True)
    stats = StatsHandler()
    handlers = tracked_handlers([stats, None, handler], {"learning_rate": 0.002, "net": {"features": [4, 8]}},
                                [model, overlays])
    assert handlers[0] is stats and len(handlers) == 2  # disabled (None) components dropped
    run_with(handler)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.data.params["learning_rate"] == "0.002" and run.data.params["net.features"] == "[4, 8]"
    assert len(client.get_metric_history(run.info.run_id, "Loss")) == 6
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"model.pt", "epoch_001_case.png"}


def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path, caplog):
    handler = MLFlowHandler(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}", experiment_name="t",
                            output_transform=lambda out: out["loss"])
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise mlflow.exceptions.MlflowException("connection refused")

    handler.client.log_batch = broken
    tracked_handlers([handler])
    with caplog.at_level(logging.WARNING, logger="pipelines.engines.tracking"):
        engine = run_with(handler)
    assert engine.state.iteration == 6  # every step ran
    assert len(calls) == 1  # after the first failure, tracking is off: no retry storm per iteration
    (record,) = [r for r in caplog.records if "training continues without tracking" in r.getMessage()]
    assert "connection refused" in record.getMessage()


def test_http_uris_cap_mlflow_retries(tmp_path, monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    tracked_handlers([MLFlowHandler(tracking_uri=f"sqlite:///{tmp_path / 'x.db'}")])
    import os

    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # a user's own setting wins
    tracked_handlers([MLFlowHandler(tracking_uri="http://127.0.0.1:9")])
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"


def test_wrapping_twice_is_harmless(tmp_path):
    handler = MLFlowHandler(tracking_uri=f"sqlite:///{tmp_path / 'x.db'}")
    tracked_handlers([handler], {"a": 1})
    start = handler.start
    tracked_handlers([handler], {"b": 2})
    assert handler.start is start and handler.experiment_param == {"a": "1"}
    with pytest.raises(TypeError):
        tracked_handlers(5)


def test_executed_config_path_is_repaired(tmp_path):
    config = tmp_path / "config_1.json"
    config.write_text("{}")
    handler = MLFlowHandler(tracking_uri=f"sqlite:///{tmp_path / 'x.db'}", artifacts=f"{tmp_path} + '/config_1.json'")
    tracked_handlers([handler], artifacts=[tmp_path / "model.pt"])
    assert handler.artifacts == (str(config), str(tmp_path / "model.pt"))
