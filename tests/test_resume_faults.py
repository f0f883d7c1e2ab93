"""Faults injected for real into `python -m pipeline.train` on 8x8 digits (slow):

* kill -9 at three points -- in the first epoch, right after a checkpoint, mid-epoch -- each run
  resumed by the next: the final weights, the losses and the MLflow curves are bitwise those of an
  uninterrupted run, in one MLflow run, FINISHED;
* a real `mlflow server` killed mid-run and restarted within tracking.retry_seconds: every metric
  arrives; a server that hangs (SIGSTOP) past it: the stage writes its outputs, fails with one
  `error:` line, and the rerun uploads what was missing without training a step.

The stage processes share one Prefect server (as `make run` does), and pause a little after each
logging window (AIGC_TEST_WINDOW_PAUSE: a sleep, nothing else) so the test can pick its moment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from aigc.config import DataConfig, load_params
from aigc.data.preprocess import preprocess, save_processed
from aigc.data.sources import load_source
from aigc.services import Service, free_port, start_mlflow, start_prefect
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

OUTS = ("generator", "checkpoint", "run", "metrics", "losses", "samples")
CURVES = tuple(f"train/{k}" for k in ("d_loss", "g_loss", "d_real", "d_fake", "d_separated", "ema_beta"))
STEPS_PER_EPOCH = 1617 // 64  # the 8x8 digits' train split at batch 64


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # over HTTPS (the default), its CA made in its folder: the stages get it in start_stage
    service = start_prefect(tmp_path_factory.mktemp("prefect"))
    PREFECT_CA["path"] = service.ca
    yield service.url
    service.stop()


PREFECT_CA: dict[str, str] = {}


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "processed"
    save_processed(preprocess(load_source(DataConfig(source="digits")), DataConfig(), seed=0), out)
    return out


def write_params(path: Path, tracking: dict, **train: object) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seed"] = 0
    params["train"] |= {"epochs": 2, "grid_size": 16, "augment": ["translation", "cutout"]} | train
    params["runtime"] |= {"threads": 1, "channels_last": False, "log_every": 5, "checkpoint_every": 1}
    params["tracking"] |= tracking
    path.write_text(yaml.safe_dump(params))
    return path


def stage_cmd(params: Path, processed: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline.train", "--params", str(params), "--processed", str(processed)]
    for key in OUTS:
        cmd += [f"--{key}", str(out / key)]
    return cmd


def start_stage(cmd: list[str], prefect: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full = os.environ | {"PREFECT_API_URL": prefect, "PREFECT_API_SSL_CERT_FILE": PREFECT_CA["path"],
                         "AIGC_TEST_WINDOW_PAUSE": "0.2"} | (env or {})
    return subprocess.Popen(cmd, cwd=ROOT, env=full, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(what: str, ok: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if proc.poll() is not None:
            raise AssertionError(f"the stage ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def checkpoint_epoch(path: Path) -> int | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["epoch"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return None


def run_id_of(path: Path) -> str | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["run"]["run_id"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return None


def last_step(client: MlflowClient, run_id: str | None, key: str = "train/d_loss") -> int:
    if run_id is None:
        return -1
    return max((m.step for m in client.get_metric_history(run_id, key)), default=-1)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def curves(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in CURVES}


def state_dicts(out: Path) -> dict:
    ckpt = torch.load(out / "checkpoint", map_location="cpu", weights_only=True)
    gen = torch.load(out / "generator", map_location="cpu", weights_only=True)
    return {"generator": gen["state_dict"], **{k: ckpt[k] for k in ("G", "G_ema", "D", "opt_g", "opt_d")}}


def assert_bitwise(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_kill_9_three_times_then_resume_gives_the_uninterrupted_run(tmp_path: Path, prefect: str, processed: Path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(db)
    art = str(tmp_path / "art")
    # The uninterrupted run, in this process (the same code, one thread: the same floating-point sums).
    from pipeline.train import run_train as train

    base_params = write_params(tmp_path / "base.yaml", {"uri": db, "experiment": "uninterrupted", "artifact_root": art})
    p = load_params(base_params)
    base = tmp_path / "base"
    train(p.seed, p.model, p.train, p.tracking, str(processed), vae=p.vae, runtime=p.runtime, **{k: str(base / k) for k in OUTS})

    params = write_params(tmp_path / "params.yaml", {"uri": db, "experiment": "killed", "artifact_root": art})
    out = tmp_path / "out"
    cmd, ckpt = stage_cmd(params, processed, out), out / "checkpoint"
    total = 2 * STEPS_PER_EPOCH

    # 1. In the first epoch: the checkpoint before it exists, and MLflow has its first steps.
    proc = start_stage(cmd, prefect, tmp_path / "1.log")
    wait_for("step 10", lambda: last_step(client, run_id_of(ckpt)) >= 10, proc, tmp_path / "1.log")
    kill(proc)
    run_id = run_id_of(ckpt)
    assert checkpoint_epoch(ckpt) == 0 and client.get_run(run_id).info.status == "RUNNING"  # what kill -9 leaves

    # 2. Right after the checkpoint of epoch 1.
    proc = start_stage(cmd, prefect, tmp_path / "2.log")
    wait_for("the checkpoint of epoch 1", lambda: checkpoint_epoch(ckpt) == 1, proc, tmp_path / "2.log")
    kill(proc)
    assert last_step(client, run_id) < 2 * STEPS_PER_EPOCH
    assert "resuming from" in (tmp_path / "2.log").read_text() and "epoch 0/2, step 0" in (tmp_path / "2.log").read_text()

    # 3. Mid-epoch: MLflow has steps of epoch 2 past the checkpoint of epoch 1.
    proc = start_stage(cmd, prefect, tmp_path / "3.log")
    wait_for("step 40", lambda: last_step(client, run_id) >= 40, proc, tmp_path / "3.log")
    kill(proc)
    assert checkpoint_epoch(ckpt) == 1 and last_step(client, run_id) < 2 * STEPS_PER_EPOCH

    # 4. To the end.
    proc = start_stage(cmd, prefect, tmp_path / "4.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "4.log").read_text()[-3000:]
    assert f"epoch 1/2, step {STEPS_PER_EPOCH} (1 epoch(s) to go)" in (tmp_path / "4.log").read_text()

    # The same networks, bit for bit; the same losses, byte for byte.
    assert_bitwise(state_dicts(base), state_dicts(out))
    assert (base / "losses").read_bytes() == (out / "losses").read_bytes()
    # One MLflow run, continued, FINISHED; every curve has each step once, with the uninterrupted values.
    (only,) = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert only.info.run_id == run_id and only.info.status == "FINISHED"
    (reference,) = client.search_runs([client.get_experiment_by_name("uninterrupted").experiment_id])
    got, want = curves(client, run_id), curves(client, reference.info.run_id)
    assert [s for s, _ in got["train/d_loss"]] == list(range(1, total + 1))
    assert got == want
    assert only.data.tags["aigc.logged.image.samples"] == "2"


def _mlflow(tmp_path: Path, port: int) -> Service:
    # no auth app: this test is about outages (the auth app has its own test in test_team.py); over
    # HTTPS (the default), the restarted server with the same certificate from tmp_path/tls
    return start_mlflow(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-art", tmp_path, port=port, auth=False)


def test_tracking_server_killed_mid_run(tmp_path: Path, prefect: str, processed: Path,
                                        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    server = _mlflow(tmp_path, port)
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", server.ca)  # this process's and the stage's clients
    client = MlflowClient(url)
    try:
        # A. The server dies mid-run and is back within tracking.retry_seconds: nothing is lost. The stage
        # runs in a thread of this process (no interpreter start-up to pay), the server is a real process.
        from pipeline.train import run_train as train

        out_a = tmp_path / "a"
        p = load_params(write_params(tmp_path / "a.yaml", {"uri": url, "experiment": "outage", "retry_seconds": 120}))
        done: dict = {}

        def stage_a() -> None:
            try:
                done["summary"] = train(p.seed, p.model, p.train, p.tracking, str(processed), vae=p.vae, runtime=p.runtime,
                                        **{k: str(out_a / k) for k in OUTS})
            except BaseException as exc:  # noqa: BLE001 -- reported by the assertion below
                done["error"] = exc

        os.environ["AIGC_TEST_WINDOW_PAUSE"] = "0.2"
        try:
            thread = threading.Thread(target=stage_a)
            thread.start()
            deadline = time.monotonic() + 240
            while last_step(client, run_id_of(out_a / "checkpoint")) < 10 and thread.is_alive():
                assert time.monotonic() < deadline, "timed out waiting for step 10"
                time.sleep(0.02)
            run_a = run_id_of(out_a / "checkpoint")
            server.stop()
            server = _mlflow(tmp_path, port)  # 6-12 s on loopback, while training goes on without it
            thread.join(timeout=300)
        finally:
            os.environ.pop("AIGC_TEST_WINDOW_PAUSE", None)
        assert "summary" in done, done
        run = client.get_run(run_a)
        assert run.info.status == "FINISHED"
        total = 2 * STEPS_PER_EPOCH
        for key in CURVES:  # no gaps, no repeats
            assert sorted(m.step for m in client.get_metric_history(run_a, key)) == list(range(1, total + 1)), key
        assert {"model", "checkpoint", "reports"} <= {a.path for a in client.list_artifacts(run_a)}

        # B. The server hangs (SIGSTOP: it accepts connections and never answers) past tracking.retry_seconds.
        out_b = tmp_path / "b"
        params_b = write_params(tmp_path / "b.yaml", {"experiment": "outage", "retry_seconds": 3})
        cmd_b = stage_cmd(params_b, processed, out_b)
        proc = start_stage(cmd_b, prefect, tmp_path / "b.log", env={
            "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        wait_for("step 10", lambda: last_step(client, run_id_of(out_b / "checkpoint")) >= 10, proc, tmp_path / "b.log")
        run_b = run_id_of(out_b / "checkpoint")
        os.killpg(server.pid, signal.SIGSTOP)
        try:
            assert proc.wait(timeout=300) == 1
        finally:
            os.killpg(server.pid, signal.SIGCONT)
        log = (tmp_path / "b.log").read_text()
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
        print(f"\nwhat the user saw: {errors[0]}")  # pytest -s shows it
        assert f"the MLflow server {url} has not answered for" in errors[0] and "tracking.retry_seconds = 3" in errors[0]
        assert "metric values" in errors[0] and "run `dvc repro`" in errors[0], errors[0]
        assert all((out_b / k).exists() for k in OUTS)  # the outputs are all written
        generator = (out_b / "generator").read_bytes()
        losses = (out_b / "losses").read_bytes()

        # The rerun (what `dvc repro` runs again, here in this process), with the server back: no
        # training, the missing values uploaded, the run FINISHED.
        p = load_params(params_b)
        summary = train(p.seed, p.model, p.train, p.tracking.model_copy(update={"uri": url}), str(processed), runtime=p.runtime,
                        vae=p.vae, **{k: str(out_b / k) for k in OUTS})
        assert "nothing left to train" in capsys.readouterr().out
        assert summary["steps"] == total
        assert (out_b / "generator").read_bytes() == generator and (out_b / "losses").read_bytes() == losses
        run = client.get_run(run_b)
        assert run.info.status == "FINISHED"
        for key in CURVES:
            assert sorted(m.step for m in client.get_metric_history(run_b, key)) == list(range(1, total + 1)), key
        assert run.data.tags["aigc.logged.image.samples"] == "2"
        assert {"model", "checkpoint", "reports"} <= {a.path for a in client.list_artifacts(run_b)}
        assert len(client.search_runs([run.info.experiment_id])) == 2  # runs A and B, nothing else
    finally:
        server.stop()
