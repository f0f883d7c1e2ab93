"""Champion promotion: the decision table (pure), then the register stage against a real temporary
MLflow store: a better version takes the alias, a worse or broken one leaves it where it was;
``@champion`` loads, ``aigc generate`` reads it, and labels are honoured or refused clearly."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from aigc.cli import main as cli
from aigc.config import RegisterConfig, TrackingConfig
from aigc.errors import UserError
from aigc.images import to_uint8
from aigc.metrics.evaluator import Evaluator, EvaluatorNet, evaluator_payload, load_evaluator
from aigc.models import NetConfig, build_generator, generator_payload, load_generator
from aigc.registry import DIRECTIONS, better, compared_value, decide, output_problem
from aigc.sampling import generate
from aigc.tracking import Registry, Run
from pipeline.register import register

CFG = RegisterConfig()
# MLflow checks the input example by running the model once: the NaN generator's pixels cast to uint8
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")


def scores(fid: float = 20.0, floor: float = 2.0, modes: float = 10, dcr: float = 0.9, **more) -> dict:
    """A reports/metrics.json as the evaluate stage writes it (only the keys the registry reads)."""
    return {"fid": fid, "fid_floor": floor, "modes": modes, "modes_floor": 10.0, "dcr_score": dcr,
            "dcr_score_floor": 0.85, "precision": 0.6, "precision_floor": 0.9, "classes": 10} | more


# --- the decision, as a table ---------------------------------------------------------------------

@pytest.mark.parametrize("candidate, champion, gate, promote, says", [
    (scores(fid=20), None, True, True, "first version to pass the gates (fid - floor = 18)"),
    (scores(fid=10), scores(fid=20), True, True, "fid - floor 8 beats the champion's 18 (lower is better)"),
    (scores(fid=30), scores(fid=20), True, False, "fid - floor 28 does not beat the champion's 18"),
    (scores(fid=20), scores(fid=20), True, False, "does not beat"),  # a tie is not a win
    # relative to the floor: a lower raw FID on data with a lower floor is not necessarily better
    (scores(fid=15, floor=0.0), scores(fid=20, floor=6.0), True, False, "fid - floor 15 does not beat the champion's 14"),
    (scores(fid=math.nan), scores(fid=20), True, False, "failed gate(s): metric = nan (needs a finite fid - fid_floor)"),
    (scores(fid=math.inf), None, True, False, "failed gate(s): metric"),
    (scores(fid=5, modes=3), scores(fid=20), True, False, "modes = 3 (needs >= 0.8 x 10 classes"),
    (scores(fid=5, dcr=0.1), scores(fid=20), True, False, "dcr_score = 0.1 (needs >= 0.5"),
    (scores(fid=5), scores(fid=20), False, False, "data_gate = False"),
    (scores(fid=5), None, None, False, "data_gate = None"),
    (scores(fid=5), {"modes": 10}, True, False, "the champion has no recorded fid - floor"),
    ({"modes": 10, "classes": 10, "dcr_score": 1.0}, None, True, False, "metric = None"),
])
def test_decision_table(candidate, champion, gate, promote, says):
    d = decide(candidate, champion, CFG, data_gate_passed=gate)
    assert d.promote is promote and d.outcome == ("promoted" if promote else "refused")
    assert says in d.reason, d.reason


def test_direction_is_explicit_per_metric_and_higher_wins_for_precision():
    assert set(DIRECTIONS) == set(RegisterConfig.model_fields["metric"].annotation.__args__)
    cfg = RegisterConfig(metric="precision")
    assert decide(scores(precision=0.8), scores(precision=0.6), cfg, True).promote
    assert not decide(scores(precision=0.5), scores(precision=0.6), cfg, True).promote
    assert better(1.0, 2.0, "lower") and not better(1.0, 2.0, "higher") and not better(1.0, 1.0, "lower")
    assert compared_value(scores(fid=7, floor=2), "fid", relative_to_floor=False) == 7


def test_a_margin_is_required_when_configured_and_a_broken_output_is_refused():
    cfg = RegisterConfig(min_improvement=1.0)
    assert not decide(scores(fid=19.5), scores(fid=20), cfg, True).promote
    assert decide(scores(fid=18.5), scores(fid=20), cfg, True).promote
    d = decide(scores(fid=1), scores(fid=20), CFG, True, output_problem="64 of 4096 output pixels are NaN or inf")
    assert not d.promote and "output = 64 of 4096 output pixels are NaN" in d.reason
    assert decide(scores(), scores(), CFG, True, is_champion=True).outcome == "kept"


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


class Project:
    """A throwaway workspace: the register stage's inputs, written by the test, and a real store."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.tracking = TrackingConfig(uri=self.uri, experiment="t", artifact_root=str(root / "art"))
        torch.manual_seed(0)
        self.evaluator = root / "evaluator.pt"
        torch.save(evaluator_payload(Evaluator(EVNET).eval()), self.evaluator)
        (root / "gate.json").write_text(json.dumps({"passed": True}))

    def common_label(self, generator: Path) -> int:
        """A class this (untrained) generator does make, by the (untrained) evaluator's judgement."""
        G, cfg = load_generator(generator)
        with torch.no_grad():
            return int(torch.mode(load_evaluator(self.evaluator)(generate(G, cfg, 64, 0)).argmax(1)).values)

    def candidate(self, name: str, metrics: dict, seed: int = 0, broken: str | None = None) -> dict:
        """Train-and-evaluate, stubbed: a generator file, its MLflow run, its metrics; then register."""
        d = self.root / name
        gen = write_generator(d / "generator.pt", seed, broken)
        run = Run.start(self.tracking, name, params={"seed": seed}, tags={"aigc.stage": "train"})
        run.end(ok=True)
        (d / "run.json").write_text(json.dumps(run.info() | {"params": {"seed": seed}, "dataset_sha256": "d" * 64,
                                                             "git_commit": "abc"}))
        (d / "metrics.json").write_text(json.dumps(metrics))
        return register(RegisterConfig(), self.tracking, str(gen), str(self.evaluator), str(d / "run.json"),
                        str(d / "metrics.json"), str(self.root / "gate.json"), str(d / "registry.json"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, dict[str, dict]]:
    """Four versions in order: good (champion), worse, broken (NaN), better (new champion); then a
    rerun of the better one."""
    p = Project(tmp_path_factory.mktemp("registry"))
    rec = {"good": p.candidate("good", scores(fid=20), seed=1),
           "worse": p.candidate("worse", scores(fid=30), seed=2)}
    client = MlflowClient(p.uri)
    rec["alias_after_worse"] = str(client.get_model_version_by_alias("aigc-generator", "champion").version)
    rec["broken"] = p.candidate("broken", scores(fid=1.0), seed=3, broken="nan")
    rec["alias_after_broken"] = str(client.get_model_version_by_alias("aigc-generator", "champion").version)
    rec["better"] = p.candidate("better", scores(fid=10), seed=4)
    rec["rerun"] = p.candidate("better", scores(fid=10), seed=4)
    # MLflow's fluent API exports the URI it is given; registering must not leave it behind (or
    # later runs would land in whatever store that was)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    return p, rec


def test_a_better_version_takes_the_alias_and_a_worse_one_leaves_it(store):
    p, rec = store
    assert rec["good"]["promoted"] and rec["good"]["version"] == "1" and rec["good"]["champion_version"] == "1"
    assert not rec["worse"]["promoted"] and rec["worse"]["version"] == "2"
    assert rec["alias_after_worse"] == "1" and rec["worse"]["champion_version"] == "1"
    assert "fid - floor 28 does not beat champion v1's 18 (lower is better)" in rec["worse"]["reason"]
    assert rec["better"]["promoted"] and rec["better"]["version"] == "4" and rec["better"]["champion_version"] == "4"
    assert rec["better"]["previous_champion"]["version"] == "1"
    # what registry.json holds: the decision, the reason and every gate
    saved = json.loads((p.root / "worse" / "registry.json").read_text())
    assert saved["outcome"] == "refused" and saved["decision"]["gates"]["modes"]["passed"] is True


def test_a_broken_generator_is_registered_but_refused_with_the_reason(store):
    p, rec = store
    assert not rec["broken"]["promoted"] and rec["alias_after_broken"] == "1"
    assert "output = " in rec["broken"]["reason"] and "NaN" in rec["broken"]["reason"]


def test_a_rerun_on_the_same_generator_reuses_its_version(store):
    p, rec = store
    assert rec["rerun"]["reused_version"] and rec["rerun"]["version"] == "4" and rec["rerun"]["outcome"] == "kept"
    assert len(MlflowClient(p.uri).search_model_versions("name = 'aigc-generator'")) == 4


def test_versions_carry_metrics_params_hash_commit_and_dataset(store):
    p, rec = store
    client = MlflowClient(p.uri)
    v = client.get_model_version("aigc-generator", "2")
    assert v.tags["metric.fid"] == "30" and v.tags["metric.fid_floor"] == "2.0"
    assert len(v.tags["aigc.params_sha256"]) == 64 and v.tags["aigc.git_commit"] == "abc"
    assert v.tags["aigc.dataset_sha256"] == "d" * 64 and v.tags["aigc.decision"] == "refused"
    run = client.get_run(v.run_id)  # logged into the training's own run
    assert run.data.tags["aigc.registered_version"] == "2" and run.info.run_name == "worse"


def test_champion_loads_as_pyfunc_and_returns_uint8_images(store, monkeypatch: pytest.MonkeyPatch):
    import mlflow.pyfunc
    import pandas as pd

    p, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", p.uri)
    model = mlflow.pyfunc.load_model("models:/aigc-generator@champion")
    out = model.predict(pd.DataFrame({"n": [3, 2], "seed": [0, 1]}))
    assert out.shape == (5, 8, 8, 1) and out.dtype == np.uint8
    G, cfg = load_generator(p.root / "better" / "generator.pt")  # the champion's file: same images
    first = generate(G, cfg, 3, 0)
    assert np.array_equal(out[:3], to_uint8(first))
    label = p.common_label(p.root / "better" / "generator.pt")
    labelled = model.predict(pd.DataFrame({"n": [2], "seed": [0], "label": [label]}))
    assert labelled.shape == (2, 8, 8, 1)


def test_generate_command_reads_the_registry(store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    p, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", p.uri)
    out = tmp_path / "grid.png"
    assert cli(["generate", "--model", "models:/aigc-generator@champion", "-n", "8", "--out", str(out)]) == 0
    assert "from models:/aigc-generator@champion (version 4)" in capsys.readouterr().out and out.stat().st_size > 0
    label = p.common_label(p.root / "worse" / "generator.pt")
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
        G, cfg = load_generator(p.root / "better" / "generator.pt")  # the champion, rebuilt here: same images
        assert np.array_equal(images[:3], to_uint8(generate(G, cfg, 3, 0)))
        bad = requests.post(f"{url}/invocations", timeout=60,
                            json={"dataframe_split": {"columns": ["n", "seed", "label"], "data": [[2, 0, 11]]}})
        assert bad.status_code == 400 and "unknown label 11" in bad.json()["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_with_tracking_off_nothing_is_registered_and_the_record_says_why(tmp_path: Path):
    p = Project(tmp_path)
    gen = write_generator(tmp_path / "g.pt", 0)
    (tmp_path / "run.json").write_text(json.dumps({"run_id": None, "params": {}}))
    (tmp_path / "metrics.json").write_text(json.dumps(scores()))
    rec = register(RegisterConfig(), TrackingConfig(enabled=False), str(gen), str(p.evaluator), str(tmp_path / "run.json"),
                   str(tmp_path / "metrics.json"), str(tmp_path / "gate.json"), str(tmp_path / "registry.json"))
    assert rec["outcome"] == "not registered" and "tracking is off" in rec["reason"]
    assert "would have promoted it" in json.loads((tmp_path / "registry.json").read_text())["reason"]
    assert not (tmp_path / "mlflow.db").exists()


def test_a_missing_input_names_the_stage_to_run(tmp_path: Path):
    p = Project(tmp_path)
    gen = write_generator(tmp_path / "g.pt", 0)
    (tmp_path / "run.json").write_text(json.dumps({"run_id": None}))
    with pytest.raises(UserError, match=r"metrics file .*nope.json not found; run the evaluate stage first"):
        register(RegisterConfig(), p.tracking, str(gen), str(p.evaluator), str(tmp_path / "run.json"),
                 str(tmp_path / "nope.json"), str(tmp_path / "gate.json"), str(tmp_path / "registry.json"))
