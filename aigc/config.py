"""Typed, validated configuration: one pydantic model per ``params.yaml`` section.

``params.yaml`` is read once and validated as a whole, so a typo anywhere fails before any
stage does work. A stage then takes only its own section (``load_section``), never the raw
dict. Every error names the key, the value it had and what is allowed, in one line per
problem (``ConfigError``), e.g.::

    params.yaml: train.lr_g = -0.1: must be > 0
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aigc.errors import ConfigError

DEFAULT_PARAMS = "params.yaml"


class _Section(BaseModel):
    # extra="forbid": an unknown key is a typo until proven otherwise.
    # strict: "3" is not an int and 1 is not a bool; YAML already gives real types.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataConfig(_Section):
    """Where the raw images come from (ingest) and how they are cleaned and split (preprocess)."""

    source: Literal["mnist5k", "digits", "idx", "npz", "csv", "folder"] = "mnist5k"
    # File or folder for the local sources (idx, npz, csv, folder); ignored by the built-ins.
    path: str = "data/source"
    # IDX only: the labels file; by default found beside the images file
    # (train-images-idx3-ubyte -> train-labels-idx1-ubyte).
    labels_path: str | None = None
    # CSV only: the column that holds the class label.
    label_column: str = "label"
    # Square side to resize/pad to; null keeps the source resolution.
    image_size: int | None = Field(default=None, ge=4, le=1024)
    resize_mode: Literal["pad", "resize"] = "pad"
    test_size: float = Field(default=0.1, gt=0.0, lt=1.0)
    # Images whose pixel standard deviation (0..255 scale) is below this are blank/constant.
    blank_std: float = Field(default=1.0, ge=0.0)


class ModelConfig(_Section):
    """The generator/discriminator family; resolution and channels come from dataset.json."""

    family: Literal["dcgan", "mlp"] = "dcgan"
    z_dim: int = Field(default=100, ge=1, le=4096)


class TrainConfig(_Section):
    epochs: int = Field(default=15, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=2, le=65_536)
    # The DCGAN paper's recipe (Radford et al. 2015): lr 2e-4, beta1 0.5.
    lr_g: float = Field(default=2e-4, gt=0.0, le=1.0)
    lr_d: float = Field(default=2e-4, gt=0.0, le=1.0)
    beta1: float = Field(default=0.5, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.999, ge=0.0, lt=1.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads: "auto" uses the cores other processes leave free (re-checked every epoch).
    threads: Literal["auto"] | Annotated[int, Field(ge=1, le=1024)] = "auto"
    # Measured here (benchmarks/): torch.compile made the CPU step slower and channels_last was
    # within noise, so both are off by default; switch them on where they help.
    compile: bool = False
    channels_last: bool = False
    # Per-step scalars are gathered on the device and handed over every this many steps,
    # so the hot loop never waits on a host copy.
    log_every: int = Field(default=25, ge=1)
    # A sample grid (from a fixed z) every this many epochs, and always after the last.
    sample_every: int = Field(default=1, ge=1)
    grid_size: int = Field(default=64, ge=1, le=1024)


class TrackingConfig(_Section):
    """MLflow. ``MLFLOW_TRACKING_URI`` in the environment overrides ``uri``."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = Field(default="aigc", min_length=1)
    # Where a new experiment stores its artifacts (local folder or a URI such as s3://...).
    artifact_root: str = "mlartifacts"


class Params(_Section):
    """The whole of params.yaml."""

    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()


S = TypeVar("S", bound=BaseModel)


def _describe(err: dict[str, Any]) -> str:
    """One pydantic error as 'what is allowed', in the user's terms."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; see params.yaml in the repository for every key)"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "missing":
        return "is required"
    return err["msg"].replace("Input should be", "must be").replace("Value error, ", "")


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        value = "(missing)" if err["type"] == "missing" else repr(err.get("input"))
        lines.append(f"{source}: {key} = {value}: {_describe(err)}")
    return "\n".join(lines)


def parse_params(raw: Any, source: str = DEFAULT_PARAMS) -> Params:
    """Validate an already-parsed params mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; ``overrides`` ({"train.epochs": 1}) are applied first."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the project root, or pass --params)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    for dotted, value in (overrides or {}).items():
        node = raw = raw or {}
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_params(raw, str(path))


def load_section(path: str | Path, name: str, model: type[S]) -> S:
    """The validated section ``name`` of params.yaml (the whole file is validated)."""
    section = getattr(load_params(path), name)
    assert isinstance(section, model), f"section {name} is not a {model.__name__}"
    return section


def flatten(params: BaseModel, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr_g": 0.0002, ...}``: the form MLflow params and DVC -S overrides use."""
    out: dict[str, Any] = {}
    for key, value in params.model_dump().items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value
