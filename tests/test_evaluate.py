"""The evaluation stages on 8x8 digits, and the sanity checks that keep the metrics honest: real
held-out images score at the floor; a collapsed generator, noise, blur and copies each score
where they should."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from aigc.config import DataConfig, EvaluateConfig, EvaluatorConfig, TrackingConfig
from aigc.data.preprocess import preprocess, save_processed
from aigc.data.sources import load_source
from aigc.errors import UserError
from aigc.metrics import calc_metrics, embed, reference
from aigc.metrics.evaluator import evaluator_net, fit_evaluator, label_indices
from aigc.models import NetConfig, build_generator, generator_payload
from aigc.tracking import Run
from pipeline.evaluate import evaluate
from pipeline.train_evaluator import train_evaluator

EVERY_SCORE = ("fid", "kid", "is", "precision", "recall", "density", "coverage", "modes", "class_kl", "dcr_score")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the stages, through their plain functions ---------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Processed 8x8 digits, a trained evaluator and an (untrained) generator with its MLflow run."""
    root = tmp_path_factory.mktemp("eval-project")
    save_processed(preprocess(load_source(DataConfig(source="digits")), DataConfig(), seed=0), root / "processed")
    summary = train_evaluator(0, EvaluatorConfig(epochs=2), str(root / "processed"), str(root / "evaluator.pt"),
                              str(root / "evaluator.json"))
    assert summary["test_accuracy"] > 0.5 and summary["test_images"] == 180
    cfg = NetConfig("dcgan", 16, 1, 8, 8)
    torch.manual_seed(0)
    torch.save(generator_payload(build_generator(cfg), cfg), root / "generator.pt")
    tracking = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="t", artifact_root=str(root / "art"))
    run = Run.start(tracking, "train", {"seed": 0}, {})
    run.end(ok=True)  # evaluation logs into a finished training run
    (root / "run.json").write_text(json.dumps(run.info()))
    return root


def stage_paths(root: Path, out: Path) -> dict[str, str]:
    paths = {"generator": root / "generator.pt", "evaluator": root / "evaluator.pt", "processed": root / "processed",
             "run": root / "run.json", "cache_dir": root / "cache", "metrics": out / "metrics.json",
             "summary": out / "eval/evaluation.json", "samples": out / "eval/samples.png",
             "nearest": out / "eval/nearest.png", "classes": out / "eval/classes.png",
             "labels": out / "eval/labels.png"}
    return {k: str(v) for k, v in paths.items()}


def test_evaluate_stage_writes_every_score_and_logs_to_the_training_run(project: Path, tmp_path: Path, capsys):
    tracking = TrackingConfig(uri="sqlite:///unused.db")  # the run file's URI wins
    cfg = EvaluateConfig(num_samples=400, kid_subsets=10)
    paths = stage_paths(project, tmp_path)
    report = evaluate(cfg, tracking, **paths)

    saved = json.loads(Path(paths["metrics"]).read_text())
    assert saved == report
    for name in EVERY_SCORE:
        assert np.isfinite(saved[name]) and np.isfinite(saved[f"{name}_floor"]), name
    assert (saved["sample_size"], saved["sets"], saved["reference_size"], saved["heldout_size"]) == (180, 2, 1617, 180)
    assert saved["classes"] == 10 and saved["modes_floor"] <= 10
    summary = json.loads(Path(paths["summary"]).read_text())
    assert "mean over 2 disjoint sets of 180" in summary["protocol"] and summary["evaluate"]["num_samples"] == 400
    for png in ("samples", "nearest", "classes"):
        assert Path(paths[png]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "embedded and cached" in capsys.readouterr().out

    run_id = json.loads((project / "run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/fid"] == pytest.approx(saved["fid"])
    assert run.data.metrics["eval/dcr_score_floor"] == pytest.approx(saved["dcr_score_floor"])
    assert run.data.tags["aigc.evaluator_weights_sha256"] == summary["evaluator"]["weights_sha256"]
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/nearest.png", "evaluation/classes.png"} <= logged

    # Again: the real statistics come from the cache, and the same params give the same scores.
    again = evaluate(cfg, tracking, **stage_paths(project, tmp_path / "again"))
    assert "real train split (1617 images): cached" in capsys.readouterr().out
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in report.items() if k != "seconds"}


def test_evaluate_with_a_dead_tracking_server_fails_first_and_writes_nothing(project: Path, tmp_path: Path):
    dead = tmp_path / "run.json"
    dead.write_text(json.dumps({"run_id": "abc", "tracking_uri": f"http://127.0.0.1:{free_port()}"}))
    paths = stage_paths(project, tmp_path) | {"run": str(dead)}
    with pytest.raises(UserError, match="not reachable"):
        evaluate(EvaluateConfig(num_samples=200), TrackingConfig(), **paths)
    assert not any(Path(paths[k]).exists() for k in ("metrics", "summary", "samples", "nearest", "classes"))


def test_attach_to_a_missing_run_and_with_tracking_off(project: Path):
    info = json.loads((project / "run.json").read_text())
    with pytest.raises(UserError, match="cannot be opened"):
        Run.attach(info | {"run_id": "0" * 32}, TrackingConfig())
    assert not Run.attach(info, TrackingConfig(enabled=False)).active
    assert not Run.attach({"run_id": None, "tracking_uri": None}, TrackingConfig()).active


def test_evaluate_refuses_an_evaluator_of_other_data(project: Path, tmp_path: Path):
    other = tmp_path / "processed"
    p = preprocess(load_source(DataConfig(source="digits")), DataConfig(image_size=12), seed=0)
    save_processed(p, other)
    paths = stage_paths(project, tmp_path) | {"processed": str(other)}
    with pytest.raises(UserError, match="makes \\(1, 8, 8\\) images but the data is \\(1, 12, 12\\)"):
        evaluate(EvaluateConfig(num_samples=200), TrackingConfig(enabled=False), **paths)


# --- sanity: each kind of generated set scores where it should -----------------------------------


@pytest.fixture(scope="module", params=["digits", pytest.param("mnist5k", marks=pytest.mark.slow)])
def sanity(request: pytest.FixtureRequest) -> dict[str, dict[str, float]]:
    """A dataset split three ways: train (the reference), test (the floor) and `fresh` -- real
    images neither split holds, standing in for a perfect generator. The evaluator is trained on
    train with the default params. The fast run uses 8x8 digits; the slow one the default data
    (5,000 real MNIST digits, offline)."""
    source = request.param
    p = preprocess(load_source(DataConfig(source=source)), DataConfig(), seed=0)
    n_fresh = 2 * len(p.test["labels"])  # two scored sets of the test split's size
    rng = np.random.default_rng(0)
    order = rng.permutation(len(p.train["labels"]))
    fresh_idx, train_idx = order[:n_fresh], order[n_fresh:]
    train_x, train_y = p.train["images"][train_idx], p.train["labels"][train_idx]
    fresh_x = torch.from_numpy(p.train["images"][fresh_idx])
    net = evaluator_net(EvaluatorConfig(), p.info)
    result = fit_evaluator(EvaluatorConfig(), net, torch.from_numpy(train_x), label_indices(train_y, net),
                           torch.from_numpy(p.test["images"]), label_indices(p.test["labels"], net), seed=0,
                           progress=False)
    assert result.test_accuracy > 0.93
    ev = result.model
    ref = reference(ev, embed(ev, train_x), embed(ev, p.test["images"]), train_y, num_samples=n_fresh, seed=0)
    cfg = EvaluateConfig(num_samples=n_fresh)

    threes = torch.from_numpy(train_x[train_y == 3])
    cases = {
        "fresh": fresh_x,
        "collapsed": threes.repeat(4, 1, 1, 1)[:n_fresh],  # a generator stuck on one class (real 3s, repeated)
        "blurred": F.avg_pool2d(F.pad(fresh_x, (1, 1, 1, 1), mode="replicate"), 3, stride=1),  # 3x3 box blur
        "noise": torch.rand(n_fresh, *fresh_x.shape[1:], generator=torch.Generator().manual_seed(0)) * 2 - 1,
        "copies": torch.from_numpy(train_x[rng.permutation(len(train_x))[:n_fresh]]),  # the training set as "generated"
    }
    scores = {name: calc_metrics(embed(ev, x), ref, cfg) for name, x in cases.items()}
    return scores | {"source": source}


def test_real_held_out_images_score_at_the_floor(sanity):
    s = sanity["fresh"]
    assert s["fid"] < 1.5 * s["fid_floor"] + 1.0
    assert abs(s["kid"] - s["kid_floor"]) < 0.05 * sanity["collapsed"]["kid"]
    for name in ("precision", "recall", "coverage"):
        assert abs(s[name] - s[f"{name}_floor"]) < 0.1, name
    assert abs(s["is"] - s["is_floor"]) < 0.15 * s["is_floor"]
    assert s["modes"] == s["modes_floor"] == 10
    assert s["class_kl"] < 0.1 and s["dcr_score"] > 0.6 and s["dcr_score_floor"] > 0.6


def test_a_collapsed_generator_has_one_mode_low_recall_and_a_high_fid(sanity):
    s = sanity["collapsed"]
    assert s["modes"] == 1 and s["modes_floor"] == 10
    assert s["recall"] < 0.3 < s["recall_floor"]
    assert s["coverage"] < 0.3 < s["coverage_floor"]
    assert s["fid"] > 10 * s["fid_floor"]
    assert s["class_kl"] > 1.5  # log 10 = 2.3 when every sample is the one class
    assert s["precision"] > 0.8  # real digits: realistic, just not diverse


def test_noise_gets_the_worst_fid_and_blur_sits_in_between(sanity):
    if sanity["source"] == "digits":
        pytest.skip("8x8 digits are too coarse: uniform noise is no further from a digit, in a small "
                    "network's features, than a digit of the wrong class is (the slow run checks MNIST)")
    fid = {name: s["fid"] for name, s in sanity.items() if name != "source"}
    assert fid["noise"] == max(fid.values()), fid
    assert sanity["fresh"]["fid_floor"] < fid["blurred"] < fid["noise"], fid
    assert fid["fresh"] < fid["blurred"], fid
    assert sanity["noise"]["precision"] < 0.2 and sanity["noise"]["kid"] > sanity["blurred"]["kid"]
    assert np.isfinite(sanity["noise"]["is"])


def test_the_training_set_passed_off_as_generated_scores_near_zero_for_dcr(sanity):
    assert sanity["copies"]["dcr_score"] < 0.05 and sanity["copies"]["dcr_closer_to_train"] > 0.99
    assert sanity["fresh"]["dcr_score"] > 10 * max(sanity["copies"]["dcr_score"], 0.01)
