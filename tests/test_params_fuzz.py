"""params.yaml fuzzed with hypothesis: whatever a user (or a bad merge) writes, the answer is a valid
Params or a ConfigError whose every line names file, key and value; never another exception."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aigc.config import Params, flatten, load_params, parse_params
from aigc.errors import ConfigError
from tests.conftest import ROOT, run_module

DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())
KEYS = sorted(flatten(Params()))  # every dotted key the project knows, e.g. "train.epochs"

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
# a known key, a misspelt one, a section replaced wholesale, or a new top-level key
key = st.sampled_from(KEYS) | st.sampled_from(KEYS).map(lambda k: k + "x") | st.sampled_from(sorted(DEFAULTS)) \
    | st.text(min_size=1, max_size=8)


def _set(raw: dict, dotted: str, value) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _round_trips(params: Params) -> None:
    """A valid config written back as params.yaml (every resolved value, as ``aigc check-params``
    prints them) loads as the same config: nothing is lost, renamed or re-resolved (a preset)."""
    again = parse_params(yaml.safe_load(yaml.safe_dump(params.model_dump())))
    assert again == params, {k: v for k, v in flatten(again).items() if flatten(params).get(k) != v}
    assert flatten(again) == flatten(params)


def _check(raw, source: str = "params.yaml") -> None:
    try:
        params = parse_params(raw, source)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        assert lines, "an empty error message"
        assert all(line.startswith(f"{source}: ") for line in lines), str(exc)
    else:
        _round_trips(params)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(key, junk), min_size=1, max_size=4))
def test_any_edit_of_params_is_valid_or_one_line_per_error(edits):
    import copy

    raw = copy.deepcopy(DEFAULTS)
    for dotted, value in edits:
        _set(raw, dotted, value)
    _check(raw)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=64).map(lambda b: b.decode("latin-1")))
def test_any_file_content_is_valid_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_params(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path)), str(exc)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(KEYS), junk)
def test_dvc_style_overrides_on_a_mangled_file_are_config_errors(tmp_path_factory, dotted, value):
    # `dvc exp run -S train.epochs=...` on a params.yaml whose section is not a mapping
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    section = dotted.split(".")[0]
    path.write_text(yaml.safe_dump({section: 3}))
    try:
        load_params(path, {dotted: value})
    except ConfigError as exc:
        assert all(line.startswith(str(path)) for line in str(exc).splitlines()), str(exc)


def test_unreadable_params_files_are_one_error_line(tmp_path: Path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00train: 1")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    for path in (binary, folder):
        try:
            load_params(path)
        except ConfigError as exc:
            assert str(exc).startswith(str(path)) and len(str(exc).splitlines()) == 1
        else:
            raise AssertionError(f"{path} was accepted")


# Each invalid example starts a stage process (~0.5 s); 12 examples, ~6 s here.
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(KEYS).filter(lambda k: not k.startswith(("tracking.", "seed"))),
       st.sampled_from([-1, "??", [1, [2]], {"a": None}, 10**15]))
def test_a_stage_given_a_bad_value_exits_1_with_one_line_and_writes_nothing(tmp_path: Path, dotted, value):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    _set(raw, dotted, value)
    try:
        params = parse_params(raw)
    except ConfigError:
        pass
    else:  # this value happens to be valid for this key: as a params.yaml file it loads, and round-trips
        (tmp_path / "valid.yaml").write_text(yaml.safe_dump(raw))
        loaded = load_params(tmp_path / "valid.yaml")
        assert loaded == params and flatten(loaded)[dotted] == value
        _round_trips(loaded)
        return
    work = tmp_path / f"case{abs(hash((dotted, repr(value))))}"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    out = work / "raw"
    res = run_module(["-m", "pipeline.ingest", "--params", str(work / "params.yaml"), "--out", str(out)], cwd=ROOT)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert err and all(line.startswith("error: ") or line.startswith(str(work)) for line in err), res.stderr
    assert not out.exists() and sorted(p.name for p in work.iterdir()) == ["params.yaml"]
