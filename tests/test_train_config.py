"""The model/train switches of issue 9 fail at load, in one line, when their values are bad."""

from __future__ import annotations

import pytest

from aigc.config import parse_params
from aigc.errors import ConfigError


@pytest.mark.parametrize(
    "raw, key, fragment",
    [
        ({"train": {"loss": "lsgan"}}, "train.loss", "must be one of 'bce', 'hinge' or 'wgan'"),
        ({"train": {"loss": "wgan"}}, "train", "needs a Lipschitz critic: set gp_weight"),
        ({"train": {"r1_gamma": -1.0}}, "train.r1_gamma", "greater than or equal to 0"),
        ({"train": {"r1_interval": 0}}, "train.r1_interval", "greater than or equal to 1"),
        ({"train": {"ema_kimg": -1.0}}, "train.ema_kimg", "greater than or equal to 0"),
        ({"train": {"ema_rampup": 0.0}}, "train.ema_rampup", "greater than 0"),
        ({"train": {"augment": ["flip"]}}, "train.augment.0", "'translation', 'cutout' or 'color'"),
        ({"train": {"augment": ["cutout", "cutout"]}}, "train", "lists a policy twice"),
        ({"train": {"guard_steps": -1}}, "train.guard_steps", "greater than or equal to 0"),
        ({"train": {"preset": "longer"}}, "train.preset", "'standard' or 'long'"),
        ({"model": {"kernel": 1}}, "model.kernel", "greater than or equal to 2"),
        ({"model": {"g_widths": [64]}}, "model.g_widths", "at least 2 items"),
        ({"model": {"kernel": 4, "g_widths": [256, 128, 64]}}, "model", "need an odd kernel"),
        ({"model": {"d_dropout": 1.0}}, "model.d_dropout", "less than 1"),
        ({"model": {"upsample": "bilinear"}}, "model.upsample", "'transposed' or 'nearest'"),
        ({"model": {"spectral_norm": "yes"}}, "model.spectral_norm", "must be a valid boolean"),
    ],
)
def test_bad_switches_fail_at_load(raw, key, fragment):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    msg = str(err.value)
    assert msg.startswith(f"params.yaml: {key} = "), msg
    assert fragment in msg and len(msg.splitlines()) == 1


def test_good_combinations_load():
    p = parse_params({"model": {"kernel": 4, "g_widths": [128, 64], "d_widths": [64, 128], "spectral_norm": True},
                      "train": {"loss": "wgan", "gp_weight": 10.0, "ema_kimg": 10.0, "ema_rampup": None,
                                "augment": ["translation", "cutout"], "r1_gamma": 0.1}})
    assert p.model.kernel == 4 and p.train.augment == ["translation", "cutout"] and p.train.ema_rampup is None


def test_the_long_preset_sets_what_params_yaml_left_at_the_default_and_says_so():
    """train.preset: long trains the measured longer recipe where params.yaml keeps the defaults, and
    the stage's line names each knob it set; standard leaves every value as written."""
    from aigc.config import TRAIN_PRESETS, TrainConfig

    defaults = {k: TrainConfig.model_fields[k].default for k in TRAIN_PRESETS["long"]}
    long = parse_params({"train": {"preset": "long", **defaults}}).train  # params.yaml as shipped
    assert TRAIN_PRESETS["long"] and all(getattr(long, k) == v for k, v in TRAIN_PRESETS["long"].items())
    assert all(f"train.{k} = {v}" in long.preset_note() for k, v in TRAIN_PRESETS["long"].items())
    assert "params.yaml's, not the preset's" not in long.preset_note()
    standard = parse_params({"train": {"epochs": 3}}).train
    assert standard.epochs == 3 and standard.preset_note() is None
    assert parse_params({"train": long.model_dump()}).train == long  # a round trip keeps it


def test_an_explicit_value_wins_over_the_preset_and_is_named(tmp_path):
    """dvc exp run -S train.preset=long -S train.epochs=80 trains 80 epochs (the preset once
    replaced them with its 150 without a word); the stage's line names both values."""
    from aigc.config import TRAIN_PRESETS, load_params
    from tests.conftest import ROOT

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    train = load_params(tmp_path / "params.yaml", {"train.preset": "long", "train.epochs": 80}).train
    assert train.preset == "long" and train.epochs == 80 and TRAIN_PRESETS["long"]["epochs"] == 150
    assert train.preset_note() == ("train.preset long: train.epochs = 80 (params.yaml's, not the preset's 150) "
                                   "(a value changed from its default in params.yaml wins over the preset's)")
    assert load_params(tmp_path / "params.yaml", {"train.preset": "long"}).train.epochs == 150
    assert parse_params({"train": train.model_dump()}).train == train  # a round trip keeps it
