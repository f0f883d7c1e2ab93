"""MLflow tracking against a real temporary SQLite store; the train stage end to end without Prefect."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from aigc import machine
from aigc.config import DataConfig, ModelConfig, RuntimeConfig, TrackingConfig, TrainConfig
from aigc.data.preprocess import preprocess, save_processed
from aigc.data.sources import load_source
from aigc.errors import UserError
from aigc.io import params_sha256
from aigc.models import load_generator
from aigc.tracking import LOCK_SUFFIX, Registry, Run
from pipeline.train import run_train as train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_records_params_batched_metrics_images_and_tags(tmp_path: Path, sqlite_uri: str):
    cfg = TrackingConfig(uri=sqlite_uri, experiment="t", artifact_root=str(tmp_path / "art"))
    run = Run.start(cfg, "r", params={"train.lr_g": 0.0002}, tags={"aigc.stage": "train"})
    run.log_metric_rows([("d_loss", 1.0 - i / 10, i) for i in range(1, 6)])
    run.log_image(np.zeros((8, 8, 3), np.uint8), key="samples", step=1)
    run.end(ok=True)
    client = MlflowClient(sqlite_uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"train.lr_g": "0.0002"}
    assert got.data.tags["aigc.stage"] == "train"
    assert [m.step for m in client.get_metric_history(run.run_id, "d_loss")] == [1, 2, 3, 4, 5]
    assert (tmp_path / "art").exists()  # explicit artifact root, never ./mlruns


def test_environment_uri_wins(tmp_path: Path, sqlite_uri: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'other.db'}", artifact_root=str(tmp_path / "art"))
    run = Run.start(cfg, "r", {}, {})
    run.end(ok=True)
    assert run.uri == sqlite_uri and not (tmp_path / "other.db").exists()


def test_dead_tracking_server_fails_fast_with_advice():
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UserError, match=r"not reachable .*unset MLFLOW_TRACKING_URI"):
        Run.start(cfg, "r", {}, {})


def test_sqlite_in_a_missing_folder(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        Run.start(TrackingConfig(uri=f"sqlite:///{tmp_path}/no/such/dir/m.db"), "r", {}, {})


def test_disabled_tracking_records_nothing():
    run = Run.start(TrackingConfig(enabled=False), "r", {}, {})
    assert not run.active and run.info()["run_id"] is None


@pytest.fixture
def processed_digits(tmp_path: Path) -> Path:
    p = preprocess(load_source(DataConfig(source="digits")), DataConfig(), seed=0)
    save_processed(p, tmp_path / "processed")
    return tmp_path / "processed"


def test_train_stage_outputs_and_mlflow_run(tmp_path: Path, sqlite_uri: str, processed_digits: Path):
    out = {k: str(tmp_path / v) for k, v in {
        "generator": "models/generator.pt", "checkpoint": "models/checkpoint.pt", "run": "models/run.json",
        "metrics": "reports/metrics.json", "losses": "reports/losses.csv", "samples": "reports/samples.png"}.items()}
    tracking = TrackingConfig(uri=sqlite_uri, experiment="e2e", artifact_root=str(tmp_path / "art"))
    summary = train(0, ModelConfig(), TrainConfig(epochs=1), tracking, str(processed_digits), **out,
                    runtime=RuntimeConfig(log_every=10))

    assert summary["steps"] == 1617 // 64 and summary["images_per_s"] > 0
    G, cfg = load_generator(out["generator"])
    assert (cfg.height, cfg.width, cfg.channels) == (8, 8, 1)
    run_info = json.loads(Path(out["run"]).read_text())
    client = MlflowClient(sqlite_uri)
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1" and run.data.params["model.family"] == "dcgan"
    assert len(run.data.tags["aigc.dataset_sha256"]) == 64
    # the machine and the kernels in force (an exported ISA cap shows here: tests/test_machine.py)
    assert {k: v for k, v in run.data.tags.items() if k.startswith("aigc.machine.")} == machine.tags()
    assert run.data.tags["aigc.machine.kernels"].startswith(f"ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN")
    for key in ("d_loss", "g_loss", "d_real", "d_fake"):  # grouped: the run page's train/ chart section
        assert len(client.get_metric_history(run.info.run_id, f"train/{key}")) == summary["steps"]
    assert {k.split("/")[0] for k in run.data.metrics} == {"train", "perf"}
    # the name says what differs: family, loss, augmentation, the params hash's first characters
    assert run.info.run_name == f"cdcgan-hinge-noaug-{run_info['params_sha256'][:7]}"
    assert run.data.tags["aigc.params_sha256"] == run_info["params_sha256"] == params_sha256(run_info["params"])
    # the experiment opens in the MLflow UI's model-training view
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # the DVC metric holds the headline only; the rest of the training's figures are in run.json
    assert set(json.loads(Path(out["metrics"]).read_text())) == {"images_per_s", "seconds", "epochs", "final_d_loss",
                                                                 "final_g_loss"}
    assert run_info["training"]["steps"] == summary["steps"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "checkpoint", "reports", "images"} <= artifacts
    losses = Path(out["losses"]).read_text().splitlines()
    # Whatever the loop reported, in the order it first reported it (aigc/stats.py).
    assert losses[0] == "step,epoch,d_loss,d_real,d_fake,d_separated,g_loss,ema_beta" and len(losses) == summary["steps"] + 1
    assert summary["likelihood"].startswith("none") and "test_bits_per_dim" not in json.loads(
        Path(out["metrics"]).read_text())  # a GAN has no likelihood: no column, and the run says so
    assert Path(out["samples"]).stat().st_size > 0


def test_train_stage_with_a_dead_server_writes_nothing(tmp_path: Path, processed_digits: Path):
    out = {k: str(tmp_path / k) for k in ("generator", "checkpoint", "run", "metrics", "losses", "samples")}
    with pytest.raises(UserError, match="not reachable"):
        train(0, ModelConfig(), TrainConfig(epochs=1), TrackingConfig(uri=f"http://127.0.0.1:{free_port()}"),
              str(processed_digits), **out)
    assert not any(Path(p).exists() for p in out.values())


def test_two_stores_in_one_process_never_mix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The process-wide MLflow URI points at a decoy store; a run, a logged pyfunc model, a
    registered version, an alias and the download all go to (and come from) the store passed in."""
    import mlflow
    import mlflow.pyfunc

    from aigc.tracking import Registry

    decoy = f"sqlite:///{tmp_path / 'decoy.db'}"
    real = f"sqlite:///{tmp_path / 'real.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # remembered as unset, restored so
    mlflow.set_tracking_uri(decoy)  # MLflow's global; it also exports the variable, which would
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # rightly win over tracking.uri: drop that copy
    try:
        echo = tmp_path / "echo.py"  # models from code; the model is beside the point here
        echo.write_text("import mlflow.models, mlflow.pyfunc\n\n"
                        "class Echo(mlflow.pyfunc.PythonModel):\n"
                        "    def predict(self, context, model_input):\n        return model_input\n\n"
                        "mlflow.models.set_model(Echo())\n")
        (tmp_path / "weights.txt").write_text("w")
        cfg = TrackingConfig(uri=real, experiment="t", artifact_root=str(tmp_path / "art"))
        run = Run.start(cfg, "r", {}, {})
        uri = run.log_pyfunc_model("generator", echo, {"weights": str(tmp_path / "weights.txt")}, None, None, ["numpy"])
        reg = Registry(real)
        version = reg.register(uri, "m", {"k": "v"})
        reg.set_alias(version, "champion")
        files = reg.download(reg.resolve("models:/m@champion"), tmp_path / "dl")
        run.end(ok=True)
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert run.uri == real and version.version == "1" and version.run_id == run.run_id
    assert files["weights"].read_text() == "w"
    assert str(MlflowClient(real).get_model_version_by_alias("m", "champion").version) == "1"
    decoy_client = MlflowClient(decoy, registry_uri=decoy)
    assert decoy_client.search_registered_models() == []
    assert decoy_client.search_experiments(filter_string="name = 't'") == []


def test_a_private_training_reports_epsilon_beside_its_scores(tmp_path: Path, sqlite_uri: str, processed_digits: Path):
    from aigc.config import DPConfig, PrivacyConfig

    out = {k: str(tmp_path / v) for k, v in {
        "generator": "models/generator.pt", "checkpoint": "models/checkpoint.pt", "run": "models/run.json",
        "metrics": "reports/metrics.json", "losses": "reports/losses.csv", "samples": "reports/samples.png"}.items()}
    tracking = TrackingConfig(uri=sqlite_uri, experiment="dp", artifact_root=str(tmp_path / "art"))
    privacy = PrivacyConfig(dp=DPConfig(enabled=True, target_epsilon=10.0))
    summary = train(0, ModelConfig(d_widths=[8], g_widths=[16, 8], kernel=4, spectral_norm=True),
                    TrainConfig(epochs=2), tracking, str(processed_digits), **out, privacy=privacy,
                    runtime=RuntimeConfig(log_every=10))
    metrics = json.loads(Path(out["metrics"]).read_text())
    assert metrics["delta"] == 1e-5 and 9.5 < metrics["epsilon"] <= 10.0 * 1.001 and metrics["epsilon"] == summary["epsilon"]
    run_info = json.loads(Path(out["run"]).read_text())
    assert run_info["privacy"]["dp"] is True and run_info["privacy"]["d_steps"] == summary["steps"] == 2 * (1617 // 64)
    assert run_info["net"]["spectral_norm"] is False  # a private D is built without it
    client = MlflowClient(sqlite_uri)
    run = client.get_run(run_info["run_id"])
    assert run.data.tags["aigc.dp"] == "true" and run.data.tags["aigc.dp.delta"] == "1e-05"
    assert run.data.params["privacy.dp.target_epsilon"] == "10.0"
    per_epoch = client.get_metric_history(run.info.run_id, "epsilon")
    assert [m.step for m in per_epoch] == [1617 // 64, 2 * (1617 // 64)]  # once per epoch
    assert per_epoch[0].value < per_epoch[1].value == pytest.approx(metrics["epsilon"], abs=1e-4)
    epsilon_rows = [line for line in Path(out["losses"]).read_text().splitlines()[1:] if not line.endswith(",")]
    assert len(epsilon_rows) == 2  # the DVC plot's epsilon column: filled at each epoch's last step
def test_the_registry_lock_excludes_waits_and_breaks_a_dead_holders_lock(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = Registry(uri)
    name = f"m{LOCK_SUFFIX}"
    with reg.lock(name):
        # held: a second taker waits, then gives up with one clear line naming the lock and its holder
        t = time.monotonic()
        with pytest.raises(UserError, match=r"the registry lock 'm.alias-lock' .* has been held for more than 1 s "
                                            r"\(by pid \d+ on "):
            with Registry(uri).lock(name, timeout_s=1, stale_s=60):
                pass
        assert time.monotonic() - t >= 1
    assert not MlflowClient(uri).search_registered_models()  # released
    # a holder that died inside the section (its lock never deleted) is broken after stale_s
    MlflowClient(uri).create_registered_model(name, tags={"aigc.lock.token": "dead"})
    with Registry(uri).lock(name, timeout_s=30, stale_s=0.5):
        held = MlflowClient(uri).get_registered_model(name)
        assert held.tags["aigc.lock.token"] != "dead"
    assert not MlflowClient(uri).search_registered_models()


def test_a_queued_experiments_copy_uses_the_projects_local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`dvc queue start` runs an experiment in <project>/.dvc/tmp/exps/tmpXXXX and deletes it after:
    a relative SQLite store (tracking.uri, or a run file's) and the artifact folder are the project's."""
    from aigc.tracking import artifact_location, project_uri, resolve_uri, workspace_root

    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(uri="sqlite:///mlflow.db", experiment="aigc", artifact_root="mlartifacts")
    monkeypatch.chdir(tmp_path)  # the project itself: relative, as the user wrote it
    assert workspace_root() is None and resolve_uri(cfg) == "sqlite:///mlflow.db"
    monkeypatch.chdir(copy)
    assert workspace_root() == tmp_path.resolve()
    assert resolve_uri(cfg) == project_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert project_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"  # absolute and server URIs stay
    assert project_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert artifact_location(cfg, resolve_uri(cfg)) == (tmp_path.resolve() / "mlartifacts" / "aigc").as_uri()
    # a run recorded by `dvc repro` in the project (run.json names the store relatively) re-opens here
    monkeypatch.chdir(tmp_path)
    run = Run.start(cfg, "r", {}, {})
    run.end(ok=True)
    monkeypatch.chdir(copy)
    again = Run.attach(run.info(), cfg)
    assert again.run_id == run.run_id and again.uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert not (copy / "mlflow.db").exists()


@pytest.mark.slow
def test_a_server_that_dies_under_evaluate_or_register_ends_the_stage_in_one_line(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch):
    """evaluate and register call MLflow directly (no outbox): a real `mlflow server` that goes
    away after the stage attached to its run turns the next call into one TrackingUnavailable
    line -- the server, what the stage was doing, what is safe and what to run -- and a server
    that is up lets the same block through."""
    from aigc.tracking import TrackingUnavailable
    from aigc.services import start_mlflow

    server = start_mlflow(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "art", tmp_path, auth=False)  # HTTPS
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", server.ca)
    try:
        cfg = TrackingConfig(uri=server.url)
        run = Run.start(cfg, "dies", {"a": 1}, {})
        with run.failing_as("logging", "never shown"):
            run.log_metrics({"eval/fid": 1.0})
        attached = Run.attach(run.info(), cfg)
    finally:
        server.stop()
    t = time.monotonic()
    with pytest.raises(TrackingUnavailable) as err:
        with attached.failing_as(f"the evaluate stage logged its scores to run {attached.run_id}",
                                 "every output is written: run `dvc repro` when it is back"):
            attached.log_metrics({"eval/fid": 2.0})
    message = str(err.value)
    assert message.startswith(f"the MLflow server {server.url} failed while the evaluate stage logged its scores "
                              f"to run {attached.run_id} (no answer: NewConnectionError); ")
    assert message.endswith("every output is written: run `dvc repro` when it is back") and "\n" not in message
    assert time.monotonic() - t < 60  # MLflow's own retries (aigc/environment.py), not a hang
