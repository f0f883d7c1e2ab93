"""Champion promotion: the decision table (pure), then the register stage against a real temporary
MLflow store: a better version takes the alias, a worse or broken one leaves it where it was;
``@champion`` loads, ``aigc generate`` reads it, and labels are honoured or refused clearly."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from aigc.cli import main as cli
from aigc.config import DataConfig, EvaluateConfig, EvaluatorConfig, RegisterConfig, TrackingConfig, TrainConfig
from aigc.data.preprocess import load_split, preprocess, save_processed
from aigc.data.sources import load_source
from aigc.errors import UserError
from aigc.images import to_uint8
from aigc.metrics.evaluator import EvaluatorNet, load_evaluator
from aigc.models import NetConfig, build_generator, generator_payload, load_generator
from aigc.promotion import DIRECTIONS, better, compared_value, decide, output_problem
from aigc.sampling import generate
from aigc.tracking import Run
from aigc.training import train_gan
from pipeline.evaluate import run_evaluate
from pipeline.register import run_register
from pipeline.train_evaluator import run_train_evaluator as train_evaluator
from tests.conftest import ROOT

CFG = RegisterConfig()
# MLflow checks the input example by running the model once: the NaN generator's pixels cast to uint8
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")


def scores(fid: float = 20.0, floor: float = 2.0, modes: float = 10, dcr: float = 0.9, se: float = 0.5, **more) -> dict:
    """A reports/metrics.json as the evaluate stage writes it (only the keys the registry reads)."""
    return {"fid": fid, "fid_se": se, "fid_floor": floor, "modes": modes, "modes_floor": 10.0, "dcr_score": dcr,
            "dcr_score_floor": 1.0, "copy_share": 0.01, "precision": 0.6, "precision_floor": 0.9, "classes": 10,
            "is": 8.0, "is_se": 0.1, "is_floor": 9.0, "density": 0.8, "density_se": 0.01, "density_floor": 1.0} | more


# --- the decision, as a table ---------------------------------------------------------------------
# margin: 2 standard errors of the difference = 2 * hypot(0.5, 0.5) = 1.41

@pytest.mark.parametrize("candidate, champion, gate, promote, says", [
    (scores(fid=20), None, True, True, "first version to pass the gates (fid - floor = 18)"),
    (scores(fid=10), scores(fid=20), True, True, "fid - floor 8 beats the champion's 18 (re-scored) by more than 1.41"),
    (scores(fid=30), scores(fid=20), True, False, "fid - floor 28 does not beat the champion's 18"),
    (scores(fid=20), scores(fid=20), True, False, "does not beat"),  # a tie is not a win
    (scores(fid=19), scores(fid=20), True, False, "by more than 1.41 (2 x the difference's standard error 0.707)"),
    (scores(fid=18.5), scores(fid=20), True, True, "beats"),
    (scores(fid=19.9, se=0.01), scores(fid=20, se=0.01), True, True, "beats"),  # small noise, small margin
    (scores(fid=10, se=None), scores(fid=20), True, False, "no spread to tell them apart from noise"),
    (scores(fid=math.nan), scores(fid=20), True, False, "failed gate(s): metric = nan (needs a finite fid - fid_floor)"),
    (scores(fid=math.inf), None, True, False, "failed gate(s): metric"),
    (scores(fid=5, modes=3), scores(fid=20), True, False, "modes = 3 (needs >= 0.8 x 10 classes"),
    (scores(fid=5, dcr=0.5), scores(fid=20), True, False, "dcr_score = 0.5 (needs >= 0.8"),
    (scores(fid=5, copy_share=0.1), scores(fid=20), True, False, "copy_share = 0.1 (needs <= 0.05"),
    (scores(fid=5), scores(fid=20), False, False, "data_gate = False"),
    (scores(fid=5), None, None, False, "data_gate = None"),
    (scores(fid=5), {"modes": 10}, True, False, "the champion's re-scored fid - floor is not a finite number"),
    ({"modes": 10, "classes": 10, "dcr_score": 1.0, "copy_share": 0.0}, None, True, False, "metric = None"),
])
def test_decision_table(candidate, champion, gate, promote, says):
    d = decide(candidate, champion, CFG, data_gate_passed=gate)
    assert d.promote is promote and d.outcome == ("promoted" if promote else "refused")
    assert says in d.reason, d.reason


def test_a_champion_that_cannot_be_rescored_is_never_replaced_on_mixed_numbers():
    d = decide(scores(fid=1), None, CFG, True, champion_version="3", champion_problem="it makes (1, 8, 8) images")
    assert not d.promote and "champion v3 cannot be re-scored with this evaluator and data (it makes" in d.reason


def test_direction_is_explicit_per_metric_and_is_density_count_from_their_floor():
    assert set(DIRECTIONS) == set(RegisterConfig.model_fields["metric"].annotation.__args__)
    cfg = RegisterConfig(metric="precision", margin_se=0)
    assert decide(scores(precision=0.8), scores(precision=0.6), cfg, True).promote
    assert not decide(scores(precision=0.5), scores(precision=0.6), cfg, True).promote
    assert better(1.0, 2.0, "lower") and not better(1.0, 2.0, "higher") and not better(1.0, 1.0, "lower")
    assert compared_value(scores(fid=7, floor=2), "fid", relative_to_floor=False) == 7
    # IS and density: good only up to the real data's own value. Above the floor is no better.
    assert DIRECTIONS["is"] == DIRECTIONS["density"] == "closer"
    cfg = RegisterConfig(metric="is")
    assert compared_value(scores(**{"is": 9.5}), "is", relative_to_floor=False) == pytest.approx(0.5)
    assert not decide(scores(**{"is": 10.0}), scores(**{"is": 8.8}), cfg, True).promote  # 1.0 off vs 0.2 off
    assert decide(scores(**{"is": 8.9}), scores(**{"is": 7.0}), cfg, True).promote
    cfg = RegisterConfig(metric="density")
    assert not decide(scores(density=1.5), scores(density=0.9), cfg, True).promote  # crowding the modes
    assert decide(scores(density=1.05), scores(density=0.7), cfg, True).promote


def test_a_margin_is_required_when_configured_and_a_broken_output_is_refused():
    cfg = RegisterConfig(min_improvement=3.0)
    assert not decide(scores(fid=17.5), scores(fid=20), cfg, True).promote
    assert decide(scores(fid=16.5), scores(fid=20), cfg, True).promote
    d = decide(scores(fid=1), scores(fid=20), CFG, True, output_problem="64 of 4096 output pixels are NaN or inf")
    assert not d.promote and "output = 64 of 4096 output pixels are NaN" in d.reason
    assert decide(scores(), scores(), CFG, True, is_champion=True).outcome == "kept"


@pytest.mark.parametrize("privacy, promote, says", [
    (None, False, "privacy = no DP guarantee (trained without privacy.dp.enabled) (needs differential privacy with "
                  "epsilon <= 10 (register.max_epsilon))"),
    ({"dp": False}, False, "privacy = no DP guarantee"),
    ({"dp": True, "epsilon": 12.5, "delta": 1e-5}, False, "privacy = epsilon 12.5 at delta 1e-05 (needs differential "
                                                          "privacy with epsilon <= 10"),
    ({"dp": True, "epsilon": 9.7, "delta": 1e-5}, True, "first version to pass the gates"),
    ({"dp": True, "epsilon": math.nan, "delta": 1e-5}, False, "privacy = nan"),
])
def test_max_epsilon_requires_a_dp_guarantee_within_the_budget(privacy, promote, says):
    d = decide(scores(fid=5), None, RegisterConfig(max_epsilon=10.0), True, privacy=privacy)
    assert d.promote is promote and says in d.reason, d.reason
    # without register.max_epsilon (the default) privacy is not a gate at all
    assert decide(scores(fid=5), None, CFG, True, privacy=privacy).promote
    assert "privacy" not in {g.name for g in decide(scores(fid=5), None, CFG, True, privacy=privacy).gates}


def test_output_problem_finds_nan_constant_and_identical_samples():
    rng = torch.Generator().manual_seed(0)
    good = torch.rand(8, 1, 4, 4, generator=rng) * 2 - 1
    assert output_problem(good, 0.01) is None
    assert "NaN" in output_problem(torch.full((8, 1, 4, 4), math.nan), 0.01)
    assert "constant output" in output_problem(torch.zeros(8, 1, 4, 4), 0.01)
    assert "same image" in output_problem(good[:1].repeat(8, 1, 1, 1), 0.01)


# --- the register stage against a real MLflow store --------------------------------------------

NET = NetConfig(family="mlp", z_dim=8, channels=1, height=8, width=8)
EVNET = EvaluatorNet(channels=1, height=8, width=8, classes=tuple(range(10)), base_channels=4, features=8)
EVAL = EvaluateConfig(num_samples=360, kid_subsets=5)  # two sets of the 180 test digits
# The gates have their own table above; here the comparison itself is under test.
STAGE = RegisterConfig(min_modes_covered=0, min_dcr_score=0, max_copy_share=1)


def write_generator(path: Path, seed: int, broken: str | None = None) -> Path:
    torch.manual_seed(seed)
    G = build_generator(NET)
    with torch.no_grad():  # weights far from the DCGAN init, so the untrained G's samples differ
        for p in G.parameters():
            p.normal_(0.0, 0.5)
    if broken == "nan":
        with torch.no_grad():
            for p in G.parameters():
                p.fill_(math.nan)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(generator_payload(G, NET), path)
    return path


def train_generator(path: Path, images: np.ndarray, seed: int) -> Path:
    """A real (tiny) training: the same recipe, only the seed differs between calls."""
    # the recipe pinned (bce, no EMA): 2 epochs on 8x8 digits are too few for an EMA of 10 kimg to move
    result = train_gan(TrainConfig(epochs=2, batch_size=64, loss="bce", ema_kimg=0.0), NET, torch.from_numpy(images),
                       seed=seed, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(generator_payload(result.generator, NET), path)
    return path


class Project:
    """A throwaway workspace: 8x8 digits, a trained evaluator, a real MLflow store; each candidate is
    evaluated by the real evaluate stage, then registered."""

    def __init__(self, root: Path, image_size: int | None = None):
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.tracking = TrackingConfig(uri=self.uri, experiment="t", artifact_root=str(root / "art"))
        self.processed = root / "processed"
        if not self.processed.exists():
            data = DataConfig(source="digits", image_size=image_size)
            save_processed(preprocess(load_source(data), data, seed=0), self.processed)
        self.evaluator = self.train_evaluator(0)
        (root / "gate.json").write_text(json.dumps({"passed": True}))

    def train_evaluator(self, seed: int) -> Path:
        path = self.root / f"evaluator-{seed}.pt"
        train_evaluator(seed, EvaluatorConfig(epochs=2, base_channels=4, features=8), str(self.processed), str(path),
                        str(self.root / f"evaluator-{seed}.json"))
        return path

    @property
    def train_images(self) -> np.ndarray:
        return load_split(self.processed, "train")["images"]

    def common_label(self, generator: Path) -> int:
        """A class this generator does make, by the evaluator's judgement."""
        G, cfg = load_generator(generator)
        with torch.no_grad():
            return int(torch.mode(load_evaluator(self.evaluator)(generate(G, cfg, 64, 0)).argmax(1)).values)

    def evaluate(self, name: str, generator: Path) -> dict:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        run = Run.start(self.tracking, name, params={"name": name}, tags={"aigc.stage": "train"})
        run.end(ok=True)
        (d / "run.json").write_text(json.dumps(run.info() | {"params": {"name": name}, "dataset_sha256": "d" * 64,
                                                             "git_commit": "abc"}))
        paths = {k: str(d / f) for k, f in (("metrics", "metrics.json"), ("summary", "evaluation.json"),
                                            ("samples", "s.png"), ("nearest", "n.png"), ("classes", "c.png"),
                                            ("labels", "l.png"))}
        return run_evaluate(EVAL, self.tracking, str(generator), str(self.evaluator), str(self.processed), str(d / "run.json"),
                        str(self.root / "cache"), **paths)

    def register(self, name: str, cfg: RegisterConfig = STAGE) -> dict:
        d = self.root / name
        return run_register(cfg, EVAL, self.tracking, str(d / "generator.pt"), str(self.evaluator), str(self.processed),
                        str(self.root / "cache"), str(d / "run.json"), str(d / "metrics.json"),
                        str(self.root / "gate.json"), str(d / "registry.json"))

    def candidate(self, name: str, seed: int, how: str = "train") -> dict:
        """Train (or write) a generator, evaluate it, register it."""
        gen = self.root / name / "generator.pt"
        if how == "train":
            train_generator(gen, self.train_images, seed)
        else:
            write_generator(gen, seed, broken="nan" if how == "nan" else None)
        self.evaluate(name, gen)
        return self.register(name)

    def champion(self) -> str:
        return str(MlflowClient(self.uri).get_model_version_by_alias("aigc-generator", "champion").version)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, dict[str, Any]]:
    """Two trainings that differ only in seed, a broken (NaN) and an untrained generator; the two
    trainings registered again alternately (a retraining that flip-flops would move the alias back);
    then the evaluator is retrained and a candidate is judged against the champion re-scored with it."""
    p = Project(tmp_path_factory.mktemp("registry"))
    rec: dict[str, Any] = {"seed1": p.candidate("seed1", seed=1)}
    rec["seed2"] = p.candidate("seed2", seed=2)
    rec["alias"] = [p.champion()]
    rec["broken"] = p.candidate("broken", seed=3, how="nan")
    rec["alias"].append(p.champion())
    rec["untrained"] = p.candidate("untrained", seed=4, how="random")
    rec["alias"].append(p.champion())
    for name in ("seed1", "seed2", "seed1", "seed2"):
        rec.setdefault("again", []).append(p.register(name))
        rec["alias"].append(p.champion())
    # MLflow's fluent API exports the URI it is given; registering must not leave it behind (or
    # later runs would land in whatever store that was)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    return p, rec


def metrics_of(p: Project, name: str) -> dict:
    return json.loads((p.root / name / "metrics.json").read_text())


def test_the_champion_is_rescored_in_this_process_and_the_rule_is_applied_to_fresh_numbers(store):
    p, rec = store
    first, second = rec["seed1"], rec["seed2"]
    assert first["promoted"] and first["version"] == "1" and first["previous_champion"] is None
    m1, m2 = metrics_of(p, "seed1"), metrics_of(p, "seed2")
    rescored = second["previous_champion"]["rescored_metrics"]
    # same evaluator, data and settings: re-scoring reproduces the champion's own evaluation
    for key in ("fid", "fid_se", "fid_floor", "coverage", "dcr_score", "copy_share"):
        assert rescored[key] == pytest.approx(m1[key], abs=1e-6), key
    d = second["decision"]
    assert d["champion_value"] == pytest.approx(rescored["fid"] - rescored["fid_floor"])
    assert d["candidate_value"] == pytest.approx(m2["fid"] - m2["fid_floor"], abs=1e-5)
    margin = 2 * math.hypot(m1["fid_se"], m2["fid_se"])
    assert d["margin"] == pytest.approx(margin, rel=1e-4)
    assert second["promoted"] is (d["candidate_value"] < d["champion_value"] - margin)
    assert "(re-scored)" in second["reason"] and second["seconds"]["rescore_champion"] > 0


def test_two_trainings_differing_only_in_seed_do_not_flip_flop_the_champion(store):
    p, rec = store
    history = rec["alias"]
    moves = [(a, b) for a, b in zip(history, history[1:], strict=False) if a != b]
    assert len(moves) <= 1, history  # once it leaves a version it never comes back
    assert all(r["reused_version"] for r in rec["again"])
    assert not any(r["promoted"] for r in rec["again"])


def test_a_broken_generator_is_registered_but_refused_and_every_comparison_follows_the_rule(store):
    p, rec = store
    assert not rec["broken"]["promoted"] and "output = " in rec["broken"]["reason"] and "NaN" in rec["broken"]["reason"]
    assert rec["alias"][1] == rec["alias"][0]
    for r in [rec["seed2"], rec["untrained"], *rec["again"]]:
        d = r["decision"]
        if r["outcome"] == "kept":
            continue
        assert r["previous_champion"]["rescored_metrics"] is not None
        assert r["promoted"] is (d["candidate_value"] < d["champion_value"] - d["margin"]), r["reason"]


def test_a_rerun_on_the_same_generator_reuses_its_version(store):
    p, rec = store
    assert len(MlflowClient(p.uri).search_model_versions("name = 'aigc-generator'")) == 4
    for r in rec["again"]:
        assert r["version"] in ("1", "2") and r["outcome"] == ("kept" if r["version"] == r["champion_version"] else "refused")


def test_versions_carry_metrics_params_hash_commit_and_dataset(store):
    p, rec = store
    client = MlflowClient(p.uri)
    v = client.get_model_version("aigc-generator", "2")
    assert float(v.tags["metric.fid"]) == pytest.approx(metrics_of(p, "seed2")["fid"])
    assert len(v.tags["aigc.params_sha256"]) == 64 and v.tags["aigc.git_commit"] == "abc"
    assert v.tags["aigc.dataset_sha256"] == "d" * 64 and v.tags["aigc.decision"] == rec["seed2"]["outcome"]
    lineage = metrics_of(p, "seed2")["lineage"]
    assert v.tags["aigc.evaluator_sha256"] == lineage["evaluator_weights_sha256"]  # weights, as the run's tags
    assert v.tags["aigc.eval_data_sha256"] == lineage["data_sha256"]
    run = client.get_run(v.run_id)  # logged into the training's own run
    assert run.data.tags["aigc.registered_version"] == "2" and run.info.run_name == "seed2"
    assert run.data.tags["eval.evaluator_sha256"] == lineage["evaluator_weights_sha256"]


def test_when_the_evaluator_changes_the_decision_uses_the_champion_rescored_with_the_new_one(tmp_path: Path):
    """A new evaluator (retrained: other weights, another feature space) between two versions: the
    champion's registered numbers are not comparable, so it is scored again with the new one."""
    p = Project(tmp_path)
    first = p.candidate("first", seed=1)
    assert first["promoted"]
    p.evaluator = p.train_evaluator(7)
    second = p.candidate("second", seed=2)
    prev = second["previous_champion"]
    assert prev["same_evaluator_as_when_registered"] is False
    assert prev["rescored_metrics"]["fid"] != pytest.approx(prev["registered_metrics"]["fid"])
    direct = p.evaluate("first-again", p.root / "first" / "generator.pt")  # the champion, evaluated with the new one
    assert prev["rescored_metrics"]["fid"] == pytest.approx(direct["fid"], abs=1e-6)
    assert second["decision"]["champion_value"] == pytest.approx(direct["fid"] - direct["fid_floor"], abs=1e-5)


def test_a_champion_that_cannot_be_rescored_blocks_promotion_with_the_reason(tmp_path: Path):
    p = Project(tmp_path / "a")
    assert p.candidate("first", seed=1)["promoted"]
    # (1) its artifacts are gone
    import shutil

    shutil.rmtree(p.root / "art")
    gone = p.candidate("second", seed=2)
    assert not gone["promoted"] and "champion v1 cannot be re-scored" in gone["reason"]
    assert "cannot be downloaded" in gone["reason"] and p.champion() == "1"
    # (2) the data changed shape: the champion makes 8x8 digits, the new data is 12x12
    small = Project(tmp_path / "b8")
    assert small.candidate("first", seed=1)["promoted"]
    q = Project(tmp_path / "b12", image_size=12)
    q.tracking, q.uri = small.tracking, small.uri
    global NET
    old, NET = NET, NetConfig(family="mlp", z_dim=8, channels=1, height=12, width=12)
    try:
        shape = q.candidate("wide", seed=3)
    finally:
        NET = old
    assert not shape["promoted"] and "makes (1, 8, 8) images but the data is (1, 12, 12)" in shape["reason"]


def test_metrics_of_other_inputs_are_refused(store, tmp_path: Path):
    p, _ = store
    d = p.root / "seed2"
    with pytest.raises(UserError, match=r"metrics.json was computed for another generator than register's inputs"):
        run_register(STAGE, EVAL, p.tracking, str(p.root / "seed1" / "generator.pt"), str(p.evaluator), str(p.processed),
                 str(p.root / "cache"), str(d / "run.json"), str(d / "metrics.json"), str(p.root / "gate.json"),
                 str(tmp_path / "registry.json"))
    with pytest.raises(UserError, match=r"another settings than"):
        run_register(STAGE, EVAL.model_copy(update={"seed": 1}), p.tracking, str(d / "generator.pt"), str(p.evaluator),
                 str(p.processed), str(p.root / "cache"), str(d / "run.json"), str(d / "metrics.json"),
                 str(p.root / "gate.json"), str(tmp_path / "registry.json"))


def champion_file(p: Project) -> Path:
    return p.root / {"1": "seed1", "2": "seed2", "4": "untrained"}[p.champion()] / "generator.pt"


def test_champion_loads_as_pyfunc_and_returns_uint8_images(store, monkeypatch: pytest.MonkeyPatch):
    import mlflow.pyfunc
    import pandas as pd

    p, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", p.uri)
    model = mlflow.pyfunc.load_model("models:/aigc-generator@champion")
    out = model.predict(pd.DataFrame({"n": [3, 2], "seed": [0, 1]}))
    assert out.shape == (5, 8, 8, 1) and out.dtype == np.uint8
    G, cfg = load_generator(champion_file(p))  # the champion's file: same images
    first = generate(G, cfg, 3, 0)
    assert np.array_equal(out[:3], to_uint8(first))
    label = p.common_label(champion_file(p))
    labelled = model.predict(pd.DataFrame({"n": [2], "seed": [0], "label": [label]}))
    assert labelled.shape == (2, 8, 8, 1)


def test_generate_command_reads_the_registry(store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    p, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", p.uri)
    out = tmp_path / "grid.png"
    assert cli(["generate", "--model", "models:/aigc-generator@champion", "-n", "8", "--out", str(out)]) == 0
    assert f"from models:/aigc-generator@champion (version {p.champion()})" in capsys.readouterr().out
    assert out.stat().st_size > 0
    label = p.common_label(p.root / "seed2" / "generator.pt")
    assert cli(["generate", "--model", "models:/aigc-generator/2", "-n", "4", "--label", str(label),
                "--out", str(out)]) == 0
    assert f"4 samples of class {label} from models:/aigc-generator/2" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--model", "models:/nope@champion"], "no registered model 'nope' in sqlite:"),
    (["--model", "models:/aigc-generator@best"], "model 'aigc-generator' has no alias 'best'"),
    (["--model", "models:/aigc-generator/99"], "model 'aigc-generator' has no version 99"),
    (["--model", "models:/aigc-generator@champion", "--label", "11"], "unknown label 11: the classes are [0, 1"),
    (["--model", "models:aigc"], "is not a registered-model URI: use models:/NAME@ALIAS"),
])
def test_generate_command_errors_are_one_clear_line(store, args, message, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, capsys):
    p, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", p.uri)
    assert cli(["generate", *args, "--out", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_a_label_without_an_evaluator_or_too_rare_is_a_clear_error(tmp_path: Path):
    gen = write_generator(tmp_path / "g.pt", 0)
    G, cfg = load_generator(gen)
    with pytest.raises(UserError, match="no evaluator classifier"):
        generate(G, cfg, 4, 0, label=3)

    class NeverThree(torch.nn.Module):  # a classifier that never says 3
        cfg = EVNET

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()

    with pytest.raises(UserError, match=r"label 3 is too rare .* 0 of 400 draws"):
        generate(G, cfg, 4, 0, label=3, evaluator=NeverThree())
    with pytest.raises(UserError, match="unknown label 10: the classes are"):
        generate(G, cfg, 4, 0, label=10, evaluator=NeverThree())
    assert generate(G, cfg, 5, 0, label=0, evaluator=NeverThree()).shape == (5, 1, 8, 8)


# --- serving: the real `mlflow models serve` on loopback ------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_serves_the_champion_over_http(store, tmp_path: Path):
    import requests

    p, _ = store
    port = free_port()
    bin_dir = Path(sys.executable).parent  # `mlflow models serve` execs uvicorn from PATH
    env = os.environ | {"MLFLOW_TRACKING_URI": p.uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/aigc-generator@champion",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the model server did not answer /ping in 90 s"
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        r = requests.post(f"{url}/invocations", timeout=60,
                          json={"dataframe_split": {"columns": ["n", "seed"], "data": [[3, 0], [2, 7]]}})
        assert r.status_code == 200, r.text
        images = np.asarray(r.json()["predictions"])
        assert images.shape == (5, 8, 8, 1) and images.min() >= 0 and images.max() <= 255
        G, cfg = load_generator(champion_file(p))  # the champion, rebuilt here: same images
        assert np.array_equal(images[:3], to_uint8(generate(G, cfg, 3, 0)))
        bad = requests.post(f"{url}/invocations", timeout=60,
                            json={"dataframe_split": {"columns": ["n", "seed", "label"], "data": [[2, 0, 11]]}})
        assert bad.status_code == 400 and "unknown label 11" in bad.json()["message"]
        # every malformed request of the load benchmark: a 4xx that says what is wrong, never a 5xx
        from aigc_bench.serving_load import MALFORMED, check, load, send, summarise

        session = requests.Session()
        for kind, body, ctype, expect in MALFORMED:
            status, _, payload = send(session, url, body, ctype, timeout_s=60)
            assert check(kind, status, payload, expect) is None, (kind, status, payload)
        # and a few seconds of 4 concurrent clients, valid and malformed mixed (the limit left out)
        burst = summarise(load(url, clients=4, seconds=3, labels=False, limit_every=0)["results"], 3)
        assert burst["requests"] > 4 and burst["server_errors_5xx"] == 0, burst
        assert burst["malformed_not_4xx_with_message"] == burst["valid_failed"] == 0, burst["problems"]
    finally:
        from aigc_bench.serving_load import stop_server

        stop_server(server)
        log.close()


# --- parallel register stages: the alias moves by compare-and-set -----------------------------------

# Each process imports everything, then waits for the go file: the two decisions start together.
DRIVER = """
import json, sys, time
from pathlib import Path
from aigc.config import EvaluateConfig, RegisterConfig, TrackingConfig
from pipeline.register import run_register
a = json.loads(sys.argv[1])
go = Path(a.pop("go"))
Path(a.pop("ready")).touch()
while not go.exists():
    time.sleep(0.01)
run_register(RegisterConfig(**a.pop("register")), EvaluateConfig(**a.pop("evaluate")), TrackingConfig(**a.pop("tracking")), **a)
"""



@pytest.mark.slow
def test_two_register_stages_at_once_never_both_replace_the_same_champion(store, tmp_path: Path):
    """Two real processes run the register stage at the same instant on one store, for a model
    that has no champion yet (the generators of seed1 and seed2, already evaluated): both pass the
    gates and decide to promote "the first version"; only one moves the alias, the other finds it
    moved and is judged again against the new champion, re-scored."""
    p, _ = store
    cfg = STAGE.model_copy(update={"model_name": "race"})
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    go = tmp_path / "go"
    procs = {}
    for name in ("seed1", "seed2"):
        d = p.root / name
        args = {"register": cfg.model_dump(), "evaluate": EVAL.model_dump(), "tracking": p.tracking.model_dump(),
                "generator": str(d / "generator.pt"), "evaluator": str(p.evaluator), "processed": str(p.processed),
                "cache_dir": str(p.root / "cache"), "run": str(d / "run.json"), "metrics": str(d / "metrics.json"),
                "data_gate": str(p.root / "gate.json"), "registry": str(tmp_path / f"{name}.json"),
                "go": str(go), "ready": str(tmp_path / f"{name}.ready")}
        # PYTHONPATH: the driver runs outside the checkout, and must import this checkout's code
        # (not whichever one the environment's editable install points at)
        procs[name] = subprocess.Popen([sys.executable, str(driver), json.dumps(args)], cwd=tmp_path,
                                       env=os.environ | {"PYTHONPATH": str(ROOT)},
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"{n}.ready").exists() for n in procs):
        assert all(q.poll() is None for q in procs.values()) and time.monotonic() < deadline, \
            {n: q.communicate()[0][-3000:] for n, q in procs.items() if q.poll() is not None}
        time.sleep(0.05)
    go.touch()
    outs = {n: q.communicate(timeout=600)[0] for n, q in procs.items()}
    for n, q in procs.items():
        assert q.returncode == 0, outs[n][-4000:]
    rec = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in procs}
    print({n: (r["version"], r["outcome"], r["reason"], r["decided_again_after_alias_moved_from"])
           for n, r in rec.items()})
    first = [n for n, r in rec.items() if r["decided_again_after_alias_moved_from"] == []]
    again = [n for n, r in rec.items() if r["decided_again_after_alias_moved_from"] == [None]]
    assert len(first) == 1 and len(again) == 1, rec
    won, later = rec[first[0]], rec[again[0]]
    assert won["promoted"] and won["previous_champion"] is None and "first version" in won["reason"]
    assert later["previous_champion"]["version"] == won["version"] and "(re-scored)" in later["reason"]
    assert f"moved to v{won['version']} while this stage decided against no champion: deciding again" in outs[again[0]]
    client = MlflowClient(p.uri)
    expected = later["version"] if later["promoted"] else won["version"]
    assert str(client.get_model_version_by_alias("race", "champion").version) == expected == later["champion_version"]
    for r in rec.values():  # the versions' tags hold the final decisions; the lock is gone
        assert client.get_model_version("race", r["version"]).tags["aigc.decision"] == r["outcome"]
    assert sorted(m.name for m in client.search_registered_models()) == ["aigc-generator", "race"]


def test_with_tracking_off_nothing_is_registered_and_the_record_says_why(tmp_path: Path):
    p = Project(tmp_path)
    gen = write_generator(tmp_path / "off" / "generator.pt", 0)
    p.evaluate("off", gen)
    (tmp_path / "off" / "run.json").write_text(json.dumps({"run_id": None, "params": {}}))
    p.tracking = TrackingConfig(enabled=False)
    rec = p.register("off")
    assert rec["outcome"] == "not registered" and "tracking is off" in rec["reason"]
    assert "would have promoted it" in json.loads((tmp_path / "off" / "registry.json").read_text())["reason"]
    assert not MlflowClient(p.uri).search_registered_models()


def test_a_missing_input_names_the_stage_to_run(tmp_path: Path):
    p = Project(tmp_path)
    gen = write_generator(tmp_path / "g.pt", 0)
    (tmp_path / "run.json").write_text(json.dumps({"run_id": None}))
    with pytest.raises(UserError, match=r"metrics file .*nope.json not found; run the evaluate stage first"):
        run_register(STAGE, EVAL, p.tracking, str(gen), str(p.evaluator), str(p.processed), str(tmp_path / "cache"),
                 str(tmp_path / "run.json"), str(tmp_path / "nope.json"), str(tmp_path / "gate.json"),
                 str(tmp_path / "registry.json"))
