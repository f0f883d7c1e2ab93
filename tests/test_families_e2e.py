"""The families sweep end to end (slow): on 8x8 digits, one epoch each, a baseline ``dvc repro``
(the default, ``model.conditional: auto``: the conditional dcgan on these labelled digits), then
``dvc exp run --queue`` for the unconditional dcgan and the VAE, run from the queue;
``dvc exp show`` lists their scores side by side, and each one trained, was evaluated and was
registered in the same MLflow store."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import assert_score, run_module, tiny_project

pytestmark = pytest.mark.slow


def sh(args: list[str], cwd: Path, env: dict[str, str] | None = None, ok: bool = True, timeout: int = 1200):
    full = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"} | (env or {})
    res = run_module(args, cwd=cwd, env=full, timeout=timeout)
    if ok:
        assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    root = tiny_project(tmp_path_factory.mktemp("families-project"))
    # Queued experiments run in temporary copies of the project: an absolute store keeps their runs here.
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        sh(cmd, root)
    repro = sh(["dvc", "repro"], root, env)
    said = repro.stdout + repro.stderr  # the stage prints; Prefect may log the line to stderr
    assert "model.conditional = auto -> conditional on 10 classes" in said, said[-3000:]
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "baseline: the default (conditional: auto)"], root)
    sh(["dvc", "exp", "run", "--queue", "-S", "model.conditional=false", "--name", "dcgan"], root, env)
    sh(["dvc", "exp", "run", "--queue", "-S", "model.family=vae", "-S", "model.conditional=false", "--name", "vae"],
       root, env)
    sh(["dvc", "exp", "run", "--run-all"], root, env)
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], root).stdout)
    exps = {}
    for base in shown:
        for exp in [base, *(base.get("experiments") or [])]:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                metrics = data.get("metrics", {}).get("reports/scores.json", {}).get("data", {})
                exps[rev.get("name") or data.get("rev")] = {"metrics": metrics, "params": data.get("params", {})}
    # the workspace keeps the baseline's outputs (queued experiments run in copies)
    exps["baseline"] = {"metrics": json.loads((root / "reports" / "scores.json").read_text())}
    return root, exps


def test_the_sweep_lists_each_family_with_its_scores(sweep):
    root, exps = sweep
    assert {"dcgan", "vae"} <= set(exps), list(exps)
    for name in ("baseline", "dcgan", "vae"):
        assert "fid" in exps[name]["metrics"], (name, exps[name]["metrics"])
        assert_score(exps[name]["metrics"], "fid", floor=False)
    # auto on labelled digits: the baseline is the conditional dcgan, scored on the labels it was asked for
    assert 0 <= exps["baseline"]["metrics"]["label_accuracy"] <= 1
    assert exps["baseline"]["metrics"]["label_accuracy_floor"] > 0.5  # the evaluator's test accuracy
    for name in ("dcgan", "vae"):  # unconditional: nothing requested to score
        assert "label_accuracy" not in exps[name]["metrics"], name


def test_each_family_trained_evaluated_and_registered_in_one_store(sweep):
    root, _ = sweep
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aigc")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`aigc.stage` = 'train'")
    kinds = {(r.data.tags["aigc.family"], r.data.tags["aigc.conditional"]) for r in runs}
    assert {("dcgan", "false"), ("dcgan", "true"), ("vae", "false")} <= kinds, kinds
    vae = next(r for r in runs if r.data.tags["aigc.family"] == "vae")
    assert {"train/recon", "train/kl", "train/neg_elbo", "eval/fid"} <= set(vae.data.metrics), vae.data.metrics
    assert vae.data.params["vae.likelihood"] == "bernoulli"
    versions = client.search_model_versions("name = 'aigc-generator'")
    assert {v.tags.get("aigc.family") for v in versions} >= {"dcgan", "vae"}
    assert len(versions) == 3
