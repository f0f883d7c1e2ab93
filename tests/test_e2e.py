"""One real end-to-end ``dvc repro`` (8x8 digits, 1 epoch) in a throwaway copy of the project,
against a real temporary MLflow SQLite store; then the no-op repro, an experiment, and a bad
source that stops the pipeline without touching what was there."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import assert_score, run_module, tiny_project

pytestmark = pytest.mark.slow

def sh(args: list[str], cwd: Path, ok: bool = True, timeout: int = 900):
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    res = run_module(args, cwd=cwd, env=env, timeout=timeout)
    if ok:
        assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tiny_project(tmp_path_factory.mktemp("project"))
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "t@example.com"], root)
    sh(["git", "config", "user.name", "t"], root)
    sh(["dvc", "init", "-q"], root)
    sh(["dvc", "config", "core.analytics", "false"], root)
    sh(["dvc", "repro"], root)
    return root


def test_repro_produces_every_output_and_an_mlflow_run(project: Path):
    for out in ["data/raw/images.npy", "data/processed/dataset.json", "models/generator.pt",
                "models/checkpoint.pt", "reports/train/losses.csv", "reports/train/samples.png"]:
        assert (project / out).exists(), out
    info = json.loads((project / "data/processed/dataset.json").read_text())
    assert info["resolution"] == [8, 8] and info["num_classes"] == 10
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run_id, "train/g_loss")) == 1617 // 64
    assert any(a.path == "images" for a in client.list_artifacts(run_id))
    assert (project / "mlartifacts").is_dir() and not (project / "mlruns").exists()
    metrics = json.loads((project / "reports/train/metrics.json").read_text())
    assert metrics["epochs"] == 1


def test_second_repro_is_a_noop(project: Path):
    before = (project / "models/generator.pt").stat().st_mtime_ns
    res = sh(["dvc", "repro"], project)
    assert "Data and pipelines are up to date" in res.stdout
    assert (project / "models/generator.pt").stat().st_mtime_ns == before


def test_generate_command_from_the_trained_file(project: Path):
    res = sh([str(Path(sys.executable).parent / "aigc"), "generate", "--model", "models/generator.pt",
              "-n", "16", "--seed", "1", "--out", "grid.png"], project)
    assert "wrote 16 samples" in res.stdout and (project / "grid.png").stat().st_size > 0


def test_experiment_with_a_changed_param_is_listed(project: Path):
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "baseline"], project)
    sh(["dvc", "exp", "run", "-S", "train.batch_size=32", "--name", "bs32"], project)
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], project).stdout)
    names = [exp.get("name") for base in shown for exp in (base.get("experiments") or [])]
    assert "bs32" in names, shown


def test_dvc_exp_show_has_the_scores_and_params_in_its_first_columns(project: Path):
    """The table a DVC user lives in: Experiment, Created, then the headline metrics (the data gate's
    verdict and counts, the training's throughput and final losses, every score with its spread and
    floor), then the params -- not 100 columns of data-quality detail first."""
    header = next(csv.reader(io.StringIO(sh(["dvc", "exp", "show", "--csv"], project).stdout)))
    table = [c for c in header if c not in ("rev", "typ", "parent")]  # --csv's extra columns; not in the table
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], project).stdout)
    data = shown[0]["revs"][0]["data"] if "revs" in shown[0] else shown[0]["data"]
    metric_files = {f: set(v["data"]) for f, v in data["metrics"].items()}
    assert set(metric_files) == {"reports/data_quality/metrics.json", "reports/train/metrics.json",
                                 "reports/scores.json"}, metric_files
    n_metrics = sum(map(len, metric_files.values()))
    def flat(d: dict, prefix: str = "") -> list[str]:  # params come nested by section: data.source, ...
        return [n for k, v in d.items() for n in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k])]

    params = [p for f in data["params"].values() for p in flat(f["data"])]
    first_param = min(table.index(p) for p in params) + 1  # 1-based column
    print(f"dvc exp show: {len(table)} columns, {n_metrics} metric columns, fid at column {table.index('fid') + 1}, "
          f"first param at column {first_param}")
    # 43 with the default model (auto: conditional on the labelled digits, so label accuracy and its floor too)
    assert table[:2] == ["Experiment", "Created"] and n_metrics <= 43
    assert first_param == 2 + n_metrics + 1 <= 46
    scores = ["fid", "kid", "is", "precision", "recall", "density", "coverage", "modes", "class_kl", "dcr_score",
              "copy_share"]
    assert {f"{s}{x}" for s in scores for x in ("", "_se", "_floor")} <= set(table[:first_param])

    # `dvc metrics diff` against the last commit: one row per changed headline number, nothing else
    diff = json.loads(sh(["dvc", "metrics", "diff", "--json", "HEAD"], project).stdout)
    rows = [k for f in diff.values() for k in f]
    assert len(rows) <= n_metrics and set(diff) <= set(metric_files), diff


def test_the_run_report_is_written_and_logged(project: Path):
    page = (project / "reports/run.html").read_text()
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    assert run_id in page and "Evaluation: every score beside its spread and floor" in page
    assert "<svg" in page and "Registry decision" in page and "<script" not in page
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert {a.path for a in client.list_artifacts(run_id, "report")} == {
        "report/run.html", "report/registry.json", "report/run.json"}
    assert client.get_run(run_id).info.run_name.startswith("cdcgan-hinge-noaug-")  # auto: conditional
def test_two_queued_experiments_run_at_once_and_the_registry_serialises_them(project: Path):
    """dvc exp run --queue twice, dvc queue start -j 2: both run (each in a temporary copy under
    .dvc/tmp/exps) into the project's own MLflow store, and the two register stages never both
    move the champion alias from the same version (a compare-and-set under the registry's lock).

    Kept small: the two variants differ in register settings only, so each experiment runs just
    the register stage (the rest is restored from the cache), and both register the same trained
    generator at about the same moment. The last experiment (bs32) is committed first, so the
    queue starts from it."""
    import subprocess

    from dvc.repo import Repo

    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "bs32"], project)
    # a one-epoch generator fails the default gates: off here, so both compete for the alias
    gates_off = ["-S", "register.min_modes_covered=0", "-S", "register.min_dcr_score=0",
                 "-S", "register.max_copy_share=1"]
    for name, margin in (("q1", "1.0"), ("q2", "3.0")):
        sh(["dvc", "exp", "run", "--queue", "--name", name, "-S", f"register.margin_se={margin}", *gates_off], project)
    t = time.monotonic()
    sh(["dvc", "queue", "start", "-j", "2"], project)
    try:
        while True:
            with Repo(str(project)) as repo:
                states = {e["name"]: e["status"] for e in repo.experiments.celery_queue.status()}
            if all(states.get(n) in ("Success", "Failed") for n in ("q1", "q2")):
                break
            assert time.monotonic() - t < 900, states
            time.sleep(2)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=project, capture_output=True, timeout=60)
    print(f"two queued experiments, 2 workers: {time.monotonic() - t:.0f} s")
    logs = {n: sh(["dvc", "queue", "logs", n], project, ok=False).stdout for n in ("q1", "q2")}
    assert states["q1"] == states["q2"] == "Success", (states, {n: log[-3000:] for n, log in logs.items()})

    # what each experiment committed (its exp ref): its run file and its registry decision
    refs = sh(["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"], project).stdout.split()
    sha = {ref.rsplit("/", 1)[1]: obj for ref, obj in zip(refs[::2], refs[1::2], strict=True)}
    show = lambda n, f: json.loads(sh(["git", "show", f"{sha[n]}:{f}"], project).stdout)  # noqa: E731
    runs = {n: show(n, "models/run.json") for n in ("q1", "q2")}
    recs = {n: show(n, "reports/registry.json") for n in ("q1", "q2")}
    # both runs landed in the project's store, not in the deleted temporary copies, and finished
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    for n, info in runs.items():
        # the run file (from the workspace's run) names the store relatively; inside the copy it
        # was re-opened in the project's store, where register also recorded the decision
        assert recs[n]["tracking_uri"] == f"sqlite:///{project / 'mlflow.db'}", recs[n]["tracking_uri"]
        run = client.get_run(info["run_id"])
        assert run.info.status == "FINISHED" and "eval/fid" in run.data.metrics
        assert run.data.tags["aigc.registered_version"] == recs[n]["version"]
    # no champion before (the one-epoch baselines failed the default gates); the same generator in
    # both: exactly one promotion, the other finds that generator is the champion ("kept"), whether
    # it was overtaken while deciding or started after the first had finished
    before = [r for r in (json.loads((project / "reports/registry.json").read_text()),)]
    assert before[0]["champion_version"] is None, before
    print({n: (r["version"], r["outcome"], r["decided_again_after_alias_moved_from"]) for n, r in recs.items()})
    assert sorted(r["outcome"] for r in recs.values()) == ["kept", "promoted"], recs
    won = next(r for r in recs.values() if r["promoted"])
    assert won["previous_champion"] is None
    assert str(client.get_model_version_by_alias("aigc-generator", "champion").version) == won["version"]


def test_bad_source_stops_the_pipeline_and_keeps_the_outputs(project: Path):
    before = (project / "data/processed/train.npz").read_bytes()
    # floats in [0, 3.7]: no known pixel range, so ingest refuses them (and nothing downstream runs)
    np.savez(project / "data/source/bad.npz", images=np.random.default_rng(0).random((4, 8, 8)) * 3.7)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(source="npz", path="data/source/bad.npz")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = sh(["dvc", "repro"], project, ok=False)
    assert res.returncode != 0
    assert "error: data/source/bad.npz: float pixels in [0.0" in res.stderr
    assert "are not in an unambiguous range" in res.stderr and "data.float_range" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert (project / "data/processed/train.npz").read_bytes() == before


def test_evaluation_lists_every_score_beside_its_floor(project: Path):
    scores = ["fid", "kid", "is", "precision", "recall", "density", "coverage", "modes", "class_kl", "dcr_score",
              "copy_share"]
    metrics = json.loads((project / "reports/metrics.json").read_text())
    for name in scores:
        assert_score(metrics, name)
    assert metrics["num_samples"] == 400 and metrics["sample_size"] == 180 and metrics["sets"] == 2
    assert json.loads((project / "reports/evaluator/metrics.json").read_text())["epochs"] == 1
    for png in ["samples", "nearest", "classes"]:
        assert (project / f"reports/eval/{png}.png").stat().st_size > 0, png
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], project).stdout)
    listed = {k for ws in shown.values() for f in ws["data"].values() for k in f.get("data", {})}
    assert {*scores, *(f"{s}_floor" for s in scores), *(f"{s}_se" for s in scores)} <= listed, listed
    # ceilings, the floors' spreads, the protocol and lineage are detail: in reports/metrics.json, not metrics
    assert not {"coverage_ceiling", "fid_floor_se", "num_samples", "lineage.data_sha256"} & listed, listed
    assert {"fid_ceiling", "fid_floor_se", "num_samples", "lineage"} <= set(metrics)
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id)
    assert run.data.metrics["eval/fid"] == pytest.approx(metrics["fid"])


def test_the_data_quality_gate_passed_and_its_report_is_a_dvc_metric(project: Path):
    summary = json.loads((project / "reports/data_quality/summary.json").read_text())
    assert summary["passed"] is True and summary["counts"]["records"] == 1797
    assert all(e["passed"] for e in summary["expectations"].values())
    assert "Data-quality gate PASSED" in (project / "reports/data_quality/report.html").read_text()
    assert sorted(p.name for p in (project / "data/validated").iterdir()) == ["images.npy", "labels.npy",
                                                                              "metadata.csv"]
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], project).stdout)
    files = {f for ws in shown.values() for f in ws["data"]}
    assert "reports/data_quality/metrics.json" in files and "reports/data_quality/summary.json" not in files, files
    headline = json.loads((project / "reports/data_quality/metrics.json").read_text())
    assert headline == {"dq_passed": True, "dq_records": 1797, "dq_warnings": 0}
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("aigc").experiment_id],
                              filter_string="tags.`aigc.stage` = 'validate'")
    assert runs and all(r.data.tags["aigc.dq_passed"] == "true" for r in runs)
