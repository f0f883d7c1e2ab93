"""The retraining flow: the overlap guard and its messages (plain ``.fn`` calls, fast), the flow once
under Prefect's test harness, and -- slow -- the real pipeline in a tiny project copy: a first run
trains and registers, a second is a cheap no-op, new source data retrains."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from filelock import FileLock
from mlflow import MlflowClient

from pipeline.retrain import LOCK, registry_record, retrain
from tests.conftest import ROOT, copy_project, run_module

PY = sys.executable


def tiny_project(root: Path, register_cmd: str, record: dict | None = None) -> Path:
    """A real DVC project (no git) whose one stage, ``register``, runs ``register_cmd`` and writes the
    record where the real register stage does (``record``, staged in decision.json)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"register": {
        "cmd": register_cmd, "deps": ["decision.json"], "outs": [{"reports/registry.json": {"cache": False}}]}}}))
    (root / "decision.json").write_text(json.dumps(record or {}))
    res = run_module([str(Path(PY).with_name("dvc")), "init", "--no-scm", "-q"], cwd=root)
    assert res.returncode == 0, res.stderr
    return root


# A stand-in register stage: prints the Prefect API it was given and writes the staged decision.
REGISTER = ("python -c \"import os, pathlib, shutil; print('api', os.environ.get('PREFECT_API_URL')); "
            "pathlib.Path('reports').mkdir(exist_ok=True); shutil.copy('decision.json', 'reports/registry.json')\"")


DECISION = {"model_name": "aigc-generator", "alias": "champion", "version": "3", "outcome": "promoted",
            "reason": "fid - floor 8 beats champion v2's 18 (lower is better)", "champion_version": "3"}


def test_the_record_path_comes_from_dvc_yaml():
    assert registry_record(ROOT) == ROOT / "reports" / "registry.json"


def test_a_second_run_skips_while_the_first_holds_the_lock(tmp_path: Path):
    project = tiny_project(tmp_path, REGISTER, DECISION)
    (project / LOCK).parent.mkdir(parents=True, exist_ok=True)
    (project / LOCK).with_suffix(".owner.json").write_text(json.dumps(
        {"pid": 4242, "host": "box", "flow_run": "f-1", "since": "2026-01-05T03:00:00"}))
    with FileLock(project / LOCK):  # the first run, mid-repro
        t = time.perf_counter()
        got = retrain.fn(project=str(project), wait_s=0.3)
        waited = time.perf_counter() - t
    assert got["status"] == "skipped" and waited >= 0.3
    assert "another retraining run holds" in got["message"] and "pid 4242 on box, flow run f-1" in got["message"]
    assert "(waited 0.3 s)" in got["message"]
    assert not registry_record(project).exists()  # nothing ran
    got = retrain.fn(project=str(project))  # lock free again
    assert got["status"] == "ran" and got["stages"] == ["register"]
    assert got["new_decision"] and got["decision"]["outcome"] == "promoted"
    again = retrain.fn(project=str(project))  # nothing changed: DVC runs no stage
    assert again["status"] == "up to date" and again["stages"] == [] and not again["new_decision"]


def test_dvc_holding_its_own_repo_lock_is_a_clean_skip(tmp_path: Path):
    import subprocess

    project = tiny_project(tmp_path, REGISTER, DECISION)
    holder = subprocess.Popen([PY, "-c", "import time; from dvc.repo import Repo; r = Repo('.'); r.lock.lock(); "
                                         "print('held', flush=True); time.sleep(120)"],
                              cwd=project, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # a `dvc repro` by hand, mid-run
        got = retrain.fn(project=str(project))
    finally:
        holder.kill()
        holder.wait()
    assert got["status"] == "skipped" and "DVC's repo lock is held by another dvc process" in got["message"]
    assert not registry_record(project).exists()


def test_a_failing_pipeline_fails_the_run_with_dvcs_error(tmp_path: Path):
    failing = 'python -c "import sys; sys.exit(3)"'
    state = retrain.fn(project=str(tiny_project(tmp_path, failing)))
    assert state.is_failed() and state.message.startswith("dvc repro failed after")
    assert "register" in state.message  # DVC's ReproductionError names the stage
    assert FileLock(tmp_path / LOCK).acquire(timeout=0)  # released on the way out


@pytest.mark.slow
def test_the_flow_once_under_prefect(tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture):
    from prefect.testing.utilities import prefect_test_harness

    project = tiny_project(tmp_path, REGISTER, DECISION)
    with prefect_test_harness(server_startup_timeout=120):
        state = retrain(project=str(project), return_state=True)
        assert state.is_completed()
        got = state.result()
        assert got["status"] == "ran" and got["new_decision"] and got["decision"]["version"] == "3"
        again = retrain(project=str(project))
        assert again["status"] == "up to date" and not again["new_decision"]
    logs = caplog.text  # the flow's logger (log_prints)
    assert "retrain: ran 1 stage(s): register" in logs
    assert "new registry decision: aigc-generator v3 promoted: fid - floor 8 beats champion v2's 18" in logs
    assert "retrain: every stage up to date" in logs
    assert "no new model, the registry is unchanged (@champion -> v3)" in logs
    # the stage process DVC starts is told this run's API (no ephemeral server of its own)
    assert "api http://127.0.0.1:" in capfd.readouterr().out


# --- the real pipeline: tiny project, digits from an NPZ "source" --------------------------------

def write_source(path: Path, n: int) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images[:n] * 255 / 16).astype(np.uint8)
    np.savez(path, images=images, labels=d.target[:n].astype(np.int64))


@pytest.mark.slow
def test_new_source_data_retrains_and_no_change_is_a_cheap_noop(tmp_path: Path):
    root = tmp_path / "project"
    copy_project(root)
    write_source(root / "data/source/digits.npz", 1200)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source="npz", path="data/source/digits.npz")
    params["train"]["epochs"] = 1
    params["evaluator"]["epochs"] = 1
    params["evaluate"]["num_samples"] = 240
    # one epoch of 8x8 digits makes a poor generator: the gates that would refuse it are off here
    params["register"].update(min_modes_covered=0.0, min_dcr_score=0.0, max_copy_share=1.0)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {"PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        assert run_module(cmd, cwd=root, env=env).returncode == 0

    def run() -> tuple[str, float]:
        t = time.perf_counter()
        res = run_module(["-m", "pipeline.retrain", "run"], cwd=root, env=env, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout + res.stderr, time.perf_counter() - t

    first, _ = run()
    assert "Running stage 'train'" in first and "new registry decision: aigc-generator v1 promoted" in first
    noop, seconds = run()
    assert "retrain: every stage up to date" in noop and "Running stage" not in noop
    assert "no new model, the registry is unchanged (@champion -> v1)" in noop
    print(f"no-op retrain: {seconds:.1f} s")

    write_source(root / "data/source/digits.npz", 1500)  # new records arrive
    again, _ = run()
    assert "Running stage 'ingest'" in again and "Running stage 'train'" in again
    assert "new registry decision: aigc-generator v2" in again
    record = json.loads((root / "reports/registry.json").read_text())
    assert record["version"] == "2" and record["previous_champion"]["version"] == "1"
    versions = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_model_versions("name = 'aigc-generator'")
    assert len(versions) == 2
