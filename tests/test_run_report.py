"""The one-page run report (aigc/run_report.py, aigc/templates/run.html.j2): built from a run's files in
the workspace or, by ``aigc report RUN_ID``, from the same files in its MLflow artifacts -- the same
page either way; self-contained; epsilon shown only when the training had it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from aigc import cli
from aigc.config import TrackingConfig
from aigc.images import save_png
from aigc.run_report import ARTIFACTS, RunFiles, render_page, workspace_files
from aigc.tracking import Run

SCORES = {"fid": 12.5, "fid_se": 0.4, "fid_floor": 0.9, "kid": 0.11, "kid_se": 0.01, "kid_floor": -0.002,
          "coverage": 0.61, "coverage_se": 0.02, "coverage_floor": 0.95}


def write_run(d: Path, *, epsilon: float | None = None) -> RunFiles:
    """The files of one run as the stages write them (a few rows each)."""
    d.mkdir(parents=True, exist_ok=True)
    params = {"seed": 0, "model.family": "dcgan", "model.conditional": False, "train.loss": "hinge"}
    training = {"images_per_s": 321.5, "seconds": 12.0, "epochs": 2, "steps": 40}
    (d / "run.json").write_text(json.dumps({
        "run_id": None, "tracking_uri": None, "git_commit": "abc1234", "dataset_sha256": "d" * 64,
        "params": params, "params_sha256": "p" * 64, "device": "cpu", "training": training}))
    headline = {k: training[k] for k in ("images_per_s", "seconds", "epochs")} | {"final_d_loss": 1.2,
                                                                                 "final_g_loss": 0.8}
    if epsilon is not None:
        headline |= {"epsilon": epsilon, "delta": 1e-5}
    (d / "train_metrics.json").write_text(json.dumps(headline))
    rows = ["step,epoch,d_loss,d_real,d_fake,g_loss"] + [f"{s},{s // 20},{1.4 - s / 100},0.6,0.4,{0.7 + s / 200}"
                                                         for s in range(1, 41)]
    (d / "losses.csv").write_text("\n".join(rows) + "\n")
    grid = np.random.default_rng(0).integers(0, 256, (16, 16, 1), dtype=np.uint8)
    save_png(grid, d / "samples.png")
    save_png(grid[:, ::-1], d / "nearest.png")
    (d / "metrics.json").write_text(json.dumps(SCORES | {"fid_floor_se": 0.1, "fid_ceiling": 0.0,
                                                         "num_samples": 400, "lineage": {"generator_sha256": "g" * 64}}))
    (d / "scores.json").write_text(json.dumps(SCORES))
    (d / "registry.json").write_text(json.dumps({
        "model_name": "aigc-generator", "alias": "champion", "outcome": "refused", "promoted": False,
        "reason": "failed gate(s): copy_share = 0.2 (needs <= 0.05)", "version": "3", "champion_version": "2",
        "decision": {"gates": {"copy_share": {"passed": False, "observed": 0.2, "bound": "<= 0.05"},
                               "modes": {"passed": True, "observed": 10.0, "bound": ">= 8"}}}}))
    (d / "gate.json").write_text(json.dumps({"passed": True, "counts": {"records": 100, "expectations": 16,
                                                                         "warnings": 0}}))
    return workspace_files(*(str(d / n) for n in ("run.json", "train_metrics.json", "losses.csv", "samples.png",
                                                  "metrics.json", "scores.json", "nearest.png", "registry.json",
                                                  "gate.json")))


def score_table(page: str) -> str:
    return re.search(r"<h2>Evaluation.*?</table>", page, re.S).group(0)


def test_the_page_tells_the_whole_story(tmp_path: Path):
    page = render_page(write_run(tmp_path))
    # every score beside its spread and floor, in the headline's order
    rows = re.findall(r"<tr><td><code>(\w+)</code></td><td class=\"num\">([^<]+)</td>\s*<td class=\"num\">([^<]+)</td>",
                      score_table(page))
    assert rows == [("fid", "12.5 ± 0.4", "0.9 ± 0.1"), ("kid", "0.11 ± 0.01", "-0.002"),
                    ("coverage", "0.61 ± 0.02", "0.95")]
    charts = re.findall(r"<h3>([^<]+)</h3>\s*(<svg.*?</svg>)", page, re.S)
    assert [title for title, _ in charts] == ["Losses per step", "Other figures of the loop per step"]
    legends = [re.findall(r"<text x=\"[\d.]+\" y=\"[\d.]+\">(\w+)</text>", svg) for _, svg in charts]
    assert legends == [["d_loss", "g_loss"], ["d_real", "d_fake"]]
    assert [svg.count("<polyline") for _, svg in charts] == [2, 2]
    assert page.count('src="data:image/png;base64,') == 2  # the last sample grid, the nearest neighbours
    assert "failed gate(s): copy_share = 0.2" in page and "<code>copy_share</code>" in page
    assert "d" * 64 in page and "p" * 64 in page and "abc1234" in page  # lineage: data, params, commit
    assert "Off: this training gives no differential-privacy guarantee" in page and "ε =" not in page
    assert "<script" not in page and not re.search(r"""(src|href)=["']?(https?:)?//""", page)


def test_epsilon_is_shown_when_the_training_had_differential_privacy(tmp_path: Path):
    page = render_page(write_run(tmp_path, epsilon=7.92))
    assert "<b>ε = 7.92</b> at δ = 1.000e-05" in page and "ε = 7.92 · registry: refused" in page


def test_aigc_report_rebuilds_the_same_page_from_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture):
    files = write_run(tmp_path / "ws")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = Run.start(TrackingConfig(uri=uri, artifact_root=str(tmp_path / "art")), "dcgan-hinge-noaug-ppppppp",
                    {"model.family": "dcgan"}, {"aigc.params_sha256": "p" * 64})
    staged = tmp_path / "staged"
    for key, artifact in ARTIFACTS.items():  # each file where the stages log it
        src = getattr(files, key)
        dst = staged / artifact
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    for folder in ("reports", "evaluation", "report"):
        for f in (staged / folder).iterdir():
            run.log_artifact(f, folder)
    run.end(True)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "from-mlflow.html"
    assert cli.main(["report", run.run_id, "--out", str(out)]) == 0
    assert f"wrote {out}: the report of MLflow run {run.run_id} (dcgan-hinge-noaug-ppppppp)" in capsys.readouterr().out
    page = out.read_text()
    assert score_table(page) == score_table(render_page(files))
    assert "<h1>dcgan-hinge-noaug-ppppppp</h1>" in page and run.run_id in page
    assert "failed gate(s): copy_share = 0.2" in page and "p" * 64 in page


def test_an_unknown_run_id_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Run.start(TrackingConfig(uri=uri, artifact_root=str(tmp_path / "art")), "r", {}, {}).end(True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    capsys.readouterr()  # MLflow's own log lines on creating the store
    assert cli.main(["report", "0123456789abcdef", "--out", str(tmp_path / "x.html")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no MLflow run '0123456789abcdef' in ") and err.count("\n") == 1
    assert not (tmp_path / "x.html").exists()


def test_the_short_id_it_prints_names_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture):
    """`aigc report` writes run-<8 characters>.html and says so; those 8 characters (any unique start
    of the id) name the run again. A start several runs share, or none, or not hex: one line each."""
    from collections import Counter

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = Run.start(TrackingConfig(uri=uri, artifact_root=str(tmp_path / "art")), "first", {}, {})
    run.end(True)
    client = MlflowClient(uri)
    exp = client.get_run(run.run_id).info.experiment_id
    ids = [run.run_id] + [client.create_run(exp, run_name=f"r{i}").info.run_id for i in range(16)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()

    assert cli.main(["report", run.run_id]) == 0  # the default file, in the current folder
    printed = capsys.readouterr().out
    short = run.run_id[:8]
    assert printed.startswith(f"wrote run-{short}.html: the report of MLflow run {run.run_id} (first)")
    assert (tmp_path / f"run-{short}.html").exists() and not (tmp_path / "reports").exists()
    (tmp_path / f"run-{short}.html").unlink()  # 8 hex characters: 2 of 17 ids share them 3 times in 10^8
    assert cli.main(["report", short]) == 0
    assert capsys.readouterr().out == printed and (tmp_path / f"run-{short}.html").exists()

    # 17 ids, 16 first characters: at least two share one
    shared, count = Counter(i[0] for i in ids).most_common(1)[0]
    assert cli.main(["report", shared, "--out", "x.html"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {count} MLflow runs in {uri} have an id that starts with '{shared}' (")
    assert err.rstrip().endswith("give more of the id") and err.count("\n") == 1
    unused = next(c for c in "0123456789abcdef" if not any(i.startswith(c * 2) for i in ids)) * 2
    assert cli.main(["report", unused, "--out", "x.html"]) == 1
    assert capsys.readouterr().err == (f"error: no MLflow run '{unused}' in {uri} (no run id starts with it); list "
                                       f"the runs with `make ui` or pass another id\n")
    assert cli.main(["report", "run-" + short, "--out", "x.html"]) == 1
    assert capsys.readouterr().err.startswith(f"error: 'run-{short}' is not an MLflow run id (32 characters")
    assert not (tmp_path / "x.html").exists()


def test_without_a_run_id_the_run_file_is_the_report_stages_from_dvc_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture):
    """The default run file is the one dvc.yaml passes to the report stage (paths live there only);
    outside a project the one error line says where it looked and what to pass instead."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read the report stage's --run path from dvc.yaml (FileNotFoundError)")
    assert "--run-file" in err and err.count("\n") == 1

    (tmp_path / "dvc.yaml").write_text("stages:\n  report:\n    cmd: python -m pipeline.report --run elsewhere/r.json\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "r.json").write_text('{"run_id": null}')
    assert cli.main(["report"]) == 1
    assert capsys.readouterr().err == "error: elsewhere/r.json names no MLflow run (tracking was off); pass a run id\n"


def test_the_held_out_likelihood_is_shown_when_the_family_has_one(tmp_path: Path):
    gan = render_page(write_run(tmp_path / "gan"))
    assert "<h2>Likelihood of the held-out split</h2>" in gan and "not recorded" in gan
    files = write_run(tmp_path / "pixelcnn")
    run = json.loads(files.run.read_text())
    run["training"] |= {"test_bits_per_dim": 1.234, "likelihood": "exact"}
    files.run.write_text(json.dumps(run))
    page = render_page(files)
    assert "<b>1.234 bits/dim</b> on the test split (exact;" in page and "1.234 bits/dim" in page.split("<h2>")[0]
