"""params.yaml: defaults, and every kind of bad value failing at load with key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pydantic import BaseModel

from aigc.config import Params, RuntimeConfig, TrainConfig, flatten, load_params, parse_params
from aigc.errors import ConfigError
from tests.conftest import ROOT, run_module


def test_repository_params_are_valid_and_match_the_defaults():
    params = load_params(ROOT / "params.yaml")
    assert params.model.family == "dcgan"
    assert params.data.source == "mnist5k"
    # params.yaml spells out every key, so no section silently relies on a code default
    on_disk = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(flatten(Params())) == {k for k in flatten(params) if k.split(".")[0] in on_disk}


def test_code_defaults_are_the_values_of_params_yaml():
    """One source of defaults: the config models' defaults are params.yaml's values, key by key
    (values compared, not keys), so `TrainConfig()` builds the recipe `make run` trains."""
    in_code, on_disk = flatten(Params()), flatten(load_params(ROOT / "params.yaml"))
    differ = {k: (in_code[k], on_disk.get(k)) for k in in_code if in_code[k] != on_disk.get(k)}
    assert not differ, f"code default != params.yaml value: {differ}"
    assert Params() == load_params(ROOT / "params.yaml")


def test_every_key_has_a_description():
    """The params reference (docs) is generated from these descriptions: none may be missing."""
    def leaves(model: type, prefix: str = ""):
        for name, field in model.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                yield from leaves(sub, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", field.description
    missing = [key for key, text in leaves(Params) if not text]
    assert not missing


def test_runtime_knobs_have_their_own_section():
    """Knobs that never change a result live in `runtime`, which no stage depends on (dvc.yaml)."""
    assert set(RuntimeConfig.model_fields) == {"device", "threads", "compile", "channels_last", "log_every",
                                               "checkpoint_every"}
    assert not set(RuntimeConfig.model_fields) & set(TrainConfig.model_fields)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    depends = [p for stage in stages.values() for p in stage.get("params", [])]
    assert not [p for p in depends if str(p).split(".")[0] == "runtime"]


@pytest.mark.parametrize(
    "raw, key, fragment",
    [
        ({"train": {"epocs": 3}}, "train.epocs", "unknown key"),
        ({"train": {"epochs": "3"}}, "train.epochs", "must be a valid integer"),
        ({"train": {"lr_g": -0.1}}, "train.lr_g", "greater than 0"),
        ({"train": {"batch_size": 1}}, "train.batch_size", "greater than or equal to 2"),
        ({"model": {"family": "gpt"}}, "model.family", "must be one of 'dcgan', 'mlp', 'vae' or 'pixelcnn'"),
        ({"model": {"family": "mlp", "conditional": True}}, "model", "the mlp family has no conditional variant"),
        ({"vae": {"likelihood": "poisson"}}, "vae.likelihood", "must be one of 'bernoulli' or 'gaussian'"),
        ({"data": {"test_size": 1.5}}, "data.test_size", "less than 1"),
        ({"tracking": {"enabled": "yes"}}, "tracking.enabled", "must be a valid boolean"),
        ({"seeed": 1}, "seeed", "unknown key"),
    ],
)
def test_bad_values_name_key_value_and_rule(raw, key, fragment):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    msg = str(err.value)
    assert msg.startswith(f"params.yaml: {key} = "), msg
    assert fragment in msg
    assert len(msg.splitlines()) == 1


def test_several_errors_are_all_reported():
    with pytest.raises(ConfigError) as err:
        parse_params({"train": {"epochs": 0, "beta1": 2.0}})
    assert len(str(err.value).splitlines()) == 2


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(bad)


def test_overrides_use_dotted_keys():
    params = load_params(ROOT / "params.yaml", {"train.epochs": 2, "data.source": "digits"})
    assert params.train.epochs == 2 and params.data.source == "digits"


def test_stage_cli_prints_one_line_and_writes_nothing(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("data:\n  source: imagenet\n")
    out = tmp_path / "raw"
    res = run_module(["-m", "pipeline.ingest", "--params", str(tmp_path / "params.yaml"), "--out", str(out)], cwd=ROOT)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert res.stderr.strip() == (f"error: {tmp_path / 'params.yaml'}: data.source = 'imagenet': must be one of "
                                  "'mnist5k', 'digits', 'idx', 'npz', 'csv' or 'folder'")
    assert not out.exists()


def test_check_params_command(tmp_path: Path):
    res = run_module([str(Path(__import__("sys").executable).parent / "aigc"), "check-params",
                      str(ROOT / "params.yaml")], cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "train.lr_g = 0.0002" in res.stdout
    (tmp_path / "p.yaml").write_text("runtime:\n  device: tpu\n")
    res = run_module([str(Path(__import__("sys").executable).parent / "aigc"), "check-params", str(tmp_path / "p.yaml")], cwd=ROOT)
    assert res.returncode == 1 and "runtime.device = 'tpu'" in res.stderr and "Traceback" not in res.stderr
