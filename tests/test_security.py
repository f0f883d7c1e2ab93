"""Loading a model never runs code hidden in a file: registered models are logged as models from
code (no pickle), a pickled pyfunc model is refused, and every ``torch.load`` reads weights only."""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from aigc.cli import main as cli
from aigc.config import TrackingConfig
from aigc.errors import UserError
from aigc.models import NetConfig, build_generator, generator_payload, load_generator
from aigc.tracking import Registry, Run
from tests.conftest import ROOT

NET = NetConfig(family="mlp", z_dim=8, channels=1, height=8, width=8)


def test_every_torch_load_reads_weights_only():
    """No ``torch.load`` in the project may unpickle arbitrary objects: each passes weights_only=True."""
    calls = []
    for folder in ("aigc", "pipeline", "aigc_bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", safe))
    assert len(calls) >= 3, calls  # the generator/evaluator files, the FID Inception weights, the benchmark
    assert [c for c, safe in calls if not safe] == []


class Payload:
    """Unpickling this runs a command: what a hostile .pt file carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_generator_file_that_carries_code_is_refused_without_running_it(tmp_path: Path, capsys):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"format": "aigc.generator/1", "config": {}, "state_dict": {}, "x": Payload(marker)}, evil)
    with pytest.raises(UserError, match=r"evil.pt: not a readable generator file \(UnpicklingError"):
        load_generator(evil)
    assert cli(["generate", "--model", str(evil), "-n", "2", "--out", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not marker.exists() and not (tmp_path / "g.png").exists()
    with open(tmp_path / "plain.pkl", "wb") as f:  # the same bytes through plain pickle do run it
        pickle.dump(Payload(marker), f)
    with open(tmp_path / "plain.pkl", "rb") as f:
        pickle.load(f)  # noqa: S301 (the point of the test)
    assert marker.exists()


def test_a_registered_model_is_code_and_loads_with_pickle_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import mlflow.artifacts
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pipeline import serving

    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"  # aigc.environment, for every process
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torch.manual_seed(0)
    torch.save(generator_payload(build_generator(NET), NET), tmp_path / "generator.pt")
    run = Run.start(TrackingConfig(uri=uri, experiment="t", artifact_root=str(tmp_path / "art")), "r", {}, {})
    model_uri = run.log_pyfunc_model("generator", serving.CODE_PATH, {"generator": str(tmp_path / "generator.pt")},
                                     serving.signature(NET), serving.input_example(), ["torch"])
    run.end(ok=True)
    reg = Registry(uri)
    version = reg.register(model_uri, "g", {})
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=MlflowClient(uri, registry_uri=uri).get_model_version_download_uri("g", version.version),
        dst_path=str(tmp_path / "dl"), tracking_uri=uri))
    flavor = __import__("yaml").safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("serving.py") and "python_model" not in flavor
    assert (local / "serving.py").read_text() == (ROOT / "pipeline/serving.py").read_text()
    assert not [p.name for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    model = mlflow.pyfunc.load_model(str(local))  # with pickle refused: the code file defines it
    assert model.predict(pd.DataFrame({"n": [3], "seed": [0]})).shape == (3, 8, 8, 1)

    # an object is refused at logging time; a cloudpickled pyfunc model is refused at loading time
    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    with pytest.raises(TypeError, match="models from code"):
        run.log_pyfunc_model("x", Echo(), {}, None, None, ["torch"])
    mlflow.pyfunc.save_model(str(tmp_path / "pickled"), python_model=Echo(), pip_requirements=["pandas"])
    assert json.dumps(sorted(p.name for p in (tmp_path / "pickled").iterdir())).count("python_model.pkl") == 1
    with pytest.raises(MlflowException, match="Deserializing model using pickle is disallowed"):
        mlflow.pyfunc.load_model(str(tmp_path / "pickled"))
