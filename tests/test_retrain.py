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


def tiny_project(root: Path) -> Path:
    """A dvc.yaml whose register stage writes the record where the real one does, nothing else."""
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"register": {
        "cmd": "true", "outs": [{"reports/registry.json": {"cache": False}}]}}}))
    return root


def fake_repro(record: dict | None, say: str = "") -> list[str]:
    """A stand-in for `dvc repro`: prints, and writes a registry record like the register stage."""
    code = f"import json, os, pathlib; print({say!r}); print('api', os.environ.get('PREFECT_API_URL'))"
    if record is not None:
        code += (f"; p = pathlib.Path('reports/registry.json'); p.parent.mkdir(exist_ok=True); "
                 f"p.write_text(json.dumps({record!r}))")
    return [PY, "-c", code]


DECISION = {"model_name": "aigc-generator", "alias": "champion", "version": "3", "outcome": "promoted",
            "reason": "fid - floor 8 beats champion v2's 18 (lower is better)", "champion_version": "3"}


def test_the_record_path_comes_from_dvc_yaml():
    assert registry_record(ROOT) == ROOT / "reports" / "registry.json"


def test_a_second_run_skips_while_the_first_holds_the_lock(tmp_path: Path):
    project = tiny_project(tmp_path)
    (project / LOCK).parent.mkdir(parents=True)
    (project / LOCK).with_suffix(".owner.json").write_text(json.dumps(
        {"pid": 4242, "host": "box", "flow_run": "f-1", "since": "2026-01-05T03:00:00"}))
    with FileLock(project / LOCK):  # the first run, mid-repro
        t = time.perf_counter()
        got = retrain.fn(project=str(project), command=fake_repro(DECISION), wait_s=0.3)
        waited = time.perf_counter() - t
    assert got["status"] == "skipped" and waited >= 0.3
    assert "another retraining run holds" in got["message"] and "pid 4242 on box, flow run f-1" in got["message"]
    assert "(waited 0.3 s)" in got["message"]
    assert not registry_record(project).exists()  # the command never ran
    got = retrain.fn(project=str(project), command=fake_repro(DECISION, "repro ran"))  # lock free again
    assert got["status"] == "ran" and got["new_decision"] and got["decision"]["outcome"] == "promoted"


def test_dvc_holding_its_own_repo_lock_is_a_clean_skip(tmp_path: Path):
    busy = [PY, "-c", "print('ERROR: Unable to acquire lock. Most likely another DVC process is running or was "
                      "terminated abruptly.'); raise SystemExit(1)"]
    got = retrain.fn(project=str(tiny_project(tmp_path)), command=busy)
    assert got["status"] == "skipped" and "DVC's repo lock is held by another dvc process" in got["message"]


def test_a_failing_pipeline_fails_the_run_with_its_error_line(tmp_path: Path):
    failing = [PY, "-c", "print('Running stage validate'); print('error: data-quality gate failed: labels'); "
                         "raise SystemExit(1)"]
    state = retrain.fn(project=str(tiny_project(tmp_path)), command=failing)
    assert state.is_failed() and "failed (exit 1)" in state.message
    assert state.message.endswith("error: data-quality gate failed: labels")
    assert FileLock(tmp_path / LOCK).acquire(timeout=0)  # released on the way out


@pytest.mark.slow
def test_the_flow_once_under_prefect(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from prefect.testing.utilities import prefect_test_harness

    project = tiny_project(tmp_path)
    with prefect_test_harness(server_startup_timeout=120):
        state = retrain(project=str(project), command=fake_repro(DECISION, "Running stage 'register'"),
                        return_state=True)
        assert state.is_completed()
        got = state.result()
        assert got["status"] == "ran" and got["new_decision"] and got["decision"]["version"] == "3"
        again = retrain(project=str(project), command=fake_repro(DECISION, "Data and pipelines are up to date."))
        assert again["status"] == "up to date" and not again["new_decision"]
    logs = caplog.text  # the flow's logger (log_prints)
    # dvc's output reaches the flow's log, and the stage flows it starts are told this run's API
    assert "Running stage 'register'" in logs and "api http://127.0.0.1:" in logs
    assert "new registry decision: aigc-generator v3 promoted: fid - floor 8 beats champion v2's 18" in logs
    assert "no new model, the registry is unchanged (@champion -> v3)" in logs


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
    assert "Data and pipelines are up to date" in noop and "Running stage" not in noop
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
