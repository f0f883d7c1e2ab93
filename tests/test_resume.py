"""Resume in-process (fast): a run resumed from any of its checkpoints ends bitwise where the
uninterrupted run ends; the stage resumes a checkpoint of the same params, data and code, starts
fresh (saying why, the dead MLflow run marked KILLED) from one of another run; a re-opened MLflow
run is sent only what it lacks; the outbox retries a failing call. The kill -9 runs are in
tests/test_resume_faults.py."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from aigc.config import DataConfig, ModelConfig, RuntimeConfig, TrackingConfig, TrainConfig, VAEConfig
from aigc.data.preprocess import preprocess, save_processed
from aigc.data.sources import load_source
from aigc.errors import UserError
from aigc.models import NetConfig
from aigc.tracking import Outbox, Run
from aigc.training import train_gan, train_vae


def tiny(n: int = 48) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def roundtrip(state: dict) -> dict:
    """What a checkpoint file gives back: serialised now (the hook's tensors are the live ones),
    loaded the safe way."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# Every source of randomness in a step: dropout, DiffAugment, lazy R1, EMA, conditional labels.
GAN = TrainConfig(epochs=3, batch_size=16, grid_size=4, ema_kimg=0.05, augment=["translation", "cutout"], r1_gamma=0.1,
                  r1_interval=2)
RT = RuntimeConfig(log_every=2, threads=1, channels_last=False, checkpoint_every=1)


def test_gan_resumed_from_each_checkpoint_ends_bitwise_equal():
    net = NetConfig("dcgan", 8, 1, 8, 8, g_widths=(32, 16), d_widths=(16, 32), kernel=4, spectral_norm=True,
                    conditional=True, classes=(0, 1, 2, 3), class_share=(0.25,) * 4)
    labels = torch.arange(48) % 4
    saved: list[dict] = []
    rows: list[dict] = []
    full = train_gan(GAN, net, tiny(), seed=5, labels=labels, progress=False, on_steps=lambda w: rows.extend(w.rows),
                     on_checkpoint=lambda s: saved.append(roundtrip(s)), runtime=RT)
    assert [s["epoch"] for s in saved] == [0, 1, 2] and [s["step"] for s in saved] == [0, 3, 6]
    final = roundtrip(full.state)
    assert final["complete"] and final["epoch"] == 3 and final["step"] == 9
    for state in saved:
        got: list[dict] = []
        resumed = train_gan(GAN, net, tiny(), seed=5, labels=labels, progress=False, resume=state,
                            on_steps=lambda w: got.extend(w.rows), runtime=RT)
        again = roundtrip(resumed.state)
        for key in ("G", "G_ema", "D", "opt_g", "opt_d", "rng", "step", "epoch"):
            assert_same_tensors(final[key], again[key], f"epoch {state['epoch']}: {key}")
        assert got == rows[state["step"]:]  # the same losses, step for step, after the resume point


def test_resume_from_a_finished_checkpoint_trains_nothing():
    net = NetConfig("mlp", 8, 1, 8, 8)
    cfg = GAN.model_copy(update={"ema_kimg": 0.0, "augment": [], "r1_gamma": 0.0})
    full = train_gan(cfg, net, tiny(), seed=1, progress=False, runtime=RT)
    windows: list = []
    again = train_gan(cfg, net, tiny(), seed=1, progress=False, resume=roundtrip(full.state), on_steps=windows.append, runtime=RT)
    assert windows == [] and again.steps == full.steps == 9
    assert_same_tensors(roundtrip(full.state)["G"], roundtrip(again.state)["G"])


def test_vae_resumed_ends_bitwise_equal():
    net = NetConfig("vae", 8, 1, 8, 8)
    cfg = TrainConfig(epochs=3, batch_size=16, grid_size=4)
    vae = VAEConfig(kl_warmup_epochs=2)
    saved: list[dict] = []
    full = train_vae(cfg, vae, net, tiny(), seed=2, progress=False, on_checkpoint=lambda s: saved.append(roundtrip(s)), runtime=RT)
    final = roundtrip(full.state)
    resumed = train_vae(cfg, vae, net, tiny(), seed=2, progress=False, resume=saved[1], runtime=RT)
    for key in ("decoder", "encoder", "opt", "rng"):
        assert_same_tensors(final[key], roundtrip(resumed.state)[key], key)


def test_a_checkpoint_of_another_seed_is_refused():
    net = NetConfig("mlp", 8, 1, 8, 8)
    cfg = TrainConfig(epochs=1, batch_size=16)
    saved: list[dict] = []
    train_gan(cfg, net, tiny(), seed=1, progress=False, on_checkpoint=lambda s: saved.append(roundtrip(s)), runtime=RT)
    with pytest.raises(UserError, match="another model family, network or seed"):
        train_gan(cfg, net, tiny(), seed=2, progress=False, resume=saved[0], runtime=RT)


class _Counter:
    """An extra state (what a DP accountant is to the loop): saved in every checkpoint, restored on resume."""

    def __init__(self) -> None:
        self.steps = 0

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


def test_extra_state_travels_with_the_checkpoint():
    net = NetConfig("mlp", 8, 1, 8, 8)
    cfg = TrainConfig(epochs=2, batch_size=16)
    counter, saved = _Counter(), []
    counter.steps = 7
    train_gan(cfg, net, tiny(), seed=0, progress=False, extra={"dp": counter},
              on_checkpoint=lambda s: saved.append(roundtrip(s)), runtime=RT)
    assert saved[-1]["extra"] == {"dp": {"steps": 7}}
    fresh = _Counter()
    train_gan(cfg, net, tiny(), seed=0, progress=False, extra={"dp": fresh}, resume=saved[-1], runtime=RT)
    assert fresh.steps == 7


# --- the stage: fingerprint, fresh start, the MLflow run ------------------------------------------------


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume-data") / "processed"
    save_processed(preprocess(load_source(DataConfig(source="digits")), DataConfig(), seed=0), out)
    return out


def _stage(tmp_path: Path, processed: Path, tracking: TrackingConfig, train_cfg: TrainConfig,
           runtime: RuntimeConfig = RuntimeConfig(threads=1, channels_last=False, log_every=5)) -> dict:
    from pipeline.train import run_train

    out = {k: str(tmp_path / "out" / k) for k in ("generator", "checkpoint", "run", "metrics", "losses", "samples")}
    return run_train(0, ModelConfig(family="mlp"), train_cfg, tracking, str(processed), **out, runtime=runtime)


def test_stage_starts_fresh_from_another_runs_checkpoint_and_marks_the_dead_run_killed(
        tmp_path: Path, sqlite_uri: str, processed: Path, capsys: pytest.CaptureFixture):
    tracking = TrackingConfig(uri=sqlite_uri, experiment="fresh", artifact_root=str(tmp_path / "art"))
    cfg = TrainConfig(epochs=1, grid_size=4)
    _stage(tmp_path, processed, tracking, cfg)
    client = MlflowClient(sqlite_uri)
    (first,) = client.search_runs([client.get_experiment_by_name("fresh").experiment_id])
    # As a SIGKILL leaves it (tests/test_resume_faults.py kills for real): the run still RUNNING.
    client.update_run(first.info.run_id, status="RUNNING")
    capsys.readouterr()

    _stage(tmp_path, processed, tracking, cfg.model_copy(update={"lr_g": 1e-4}))
    out = capsys.readouterr().out
    assert "starting fresh: " in out and "params changed (train.lr_g 0.0002 -> 0.0001)" in out, out
    assert f"MLflow run {first.info.run_id} of the interrupted training is marked KILLED" in out
    assert client.get_run(first.info.run_id).info.status == "KILLED"
    runs = client.search_runs([client.get_experiment_by_name("fresh").experiment_id], order_by=["start_time DESC"])
    assert len(runs) == 2 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["aigc.previous_run"] == first.info.run_id


def test_stage_rerun_on_a_finished_checkpoint_trains_nothing_and_keeps_the_run(
        tmp_path: Path, sqlite_uri: str, processed: Path, capsys: pytest.CaptureFixture):
    tracking = TrackingConfig(uri=sqlite_uri, experiment="again", artifact_root=str(tmp_path / "art"))
    cfg = TrainConfig(epochs=1, grid_size=4)
    first = _stage(tmp_path, processed, tracking, cfg, RuntimeConfig(threads=1, channels_last=False, log_every=5,
                                                                     checkpoint_every=0))
    generator = (tmp_path / "out" / "generator").read_bytes()
    losses = (tmp_path / "out" / "losses").read_text()
    capsys.readouterr()
    second = _stage(tmp_path, processed, tracking, cfg, RuntimeConfig(threads=2, channels_last=False, log_every=3))
    assert "nothing left to train" in capsys.readouterr().out
    assert second["steps"] == first["steps"]
    assert (tmp_path / "out" / "generator").read_bytes() == generator
    assert (tmp_path / "out" / "losses").read_text() == losses
    client = MlflowClient(sqlite_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("again").experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/d_loss")
    assert sorted(m.step for m in history) == list(range(1, first["steps"] + 1))  # each step once


def test_reopened_run_gets_only_what_it_lacks(tmp_path: Path, sqlite_uri: str):
    cfg = TrackingConfig(uri=sqlite_uri, experiment="reopen", artifact_root=str(tmp_path / "art"))
    run = Run.start(cfg, "r", {}, {})
    run.buffer(retry_seconds=5)
    run.log_metric_rows([("loss", float(s), s) for s in range(1, 6)])
    run.log_image(np.zeros((4, 4, 3), np.uint8), "samples", step=1)
    assert run.outbox.close() == []  # delivered; the process "dies" here: no end()
    again = Run.reopen(run.info(), cfg)
    assert again is not None and again.run_id == run.run_id
    assert again.logged == {"loss": 5, "image.samples": 1}
    again.log_metric_rows([("loss", float(s), s) for s in range(1, 9)])
    again.log_image(np.zeros((4, 4, 3), np.uint8), "samples", step=1)  # skipped: already there
    assert again.end(ok=True) is None
    client = MlflowClient(sqlite_uri)
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == list(range(1, 9))
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert len([a for a in client.list_artifacts(run.run_id, "images") if a.path.endswith(".png")]) <= 2
    assert Run.reopen(run.info(), cfg.model_copy(update={"uri": f"sqlite:///{tmp_path / 'other.db'}"})) is None


def test_outbox_retries_in_order_until_the_call_goes_through():
    failures = {"left": 3}
    done: list[int] = []

    def flaky(i: int) -> None:
        if i == 1 and failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("server restarting")
        done.append(i)

    box = Outbox(retry_seconds=30)
    for i in range(3):
        box.put(f"metrics:{i + 1}", lambda i=i: flaky(i))
    assert box.close() == [] and done == [0, 1, 2] and box.outages == 1


def test_outbox_gives_up_after_retry_seconds_of_outage_and_keeps_the_rest():
    box = Outbox(retry_seconds=0.5)
    box.put("metrics:4", lambda: (_ for _ in ()).throw(ConnectionError("down")))
    box.put("image:samples", lambda: None)
    t = time.monotonic()
    assert box.close() == ["metrics:4", "image:samples"]
    assert time.monotonic() - t < 10
    assert threading.active_count() >= 1
