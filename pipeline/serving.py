"""The served generator: an ``mlflow.pyfunc`` model that rebuilds the generator from its own file.

    mlflow models serve -m models:/aigc-generator@champion --env-manager local --port 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
         -d '{"dataframe_split": {"columns": ["n", "seed"], "data": [[4, 0]]}}'

Input, one row per request (a DataFrame): ``n`` (long), ``seed`` (long), optional ``label``
(long). A conditional generator makes the label's class itself (and, without a label, draws
classes by the data's shares); an unconditional one draws it by rejection with the evaluator
classifier (aigc/sampling.py). Output: uint8 images (N, H, W, C), the rows' images one after another.

The model's artifacts are the generator file and, for labels, the evaluator file; both rebuild
from the file alone (``aigc.models.load_generator``, ``aigc.metrics.evaluator.load_evaluator``).
``mlflow.pytorch.log_model`` is not used: it stores a torch.fx graph, not the generator with its
(n, seed, label) interface (docs/development.md, "The stack").

Logged as *models from code*: the registered model holds a copy of this file (``serving.py``
beside ``MLmodel``) and the artifacts, not a cloudpickle of a ``GeneratorModel`` object.
Loading it runs this readable source (its ``mlflow.models.set_model`` line below) instead of
unpickling bytes, which can execute arbitrary code; ``aigc.environment`` also sets
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``, so a pickled pyfunc model is refused outright.
"""

from __future__ import annotations

import math
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.types.schema import AnyType

from aigc.errors import UserError
from aigc.models import NetConfig

# What the served model imports (aigc.models, aigc.sampling, pandas for the input; for labels
# aigc.metrics.evaluator, whose package loads torchmetrics); pinned as aigc pins them.
SERVING_PACKAGES = ("torch", "numpy", "pandas", "pydantic", "PyYAML", "tqdm", "pillow", "torchmetrics", "mlflow")


# Images per HTTP request. The scoring server answers with JSON lists of pixels, built in memory:
# under the load benchmark (aigc_bench/serving_load.py, 8 clients) requests for 10,000 images each
# took over 60 s, blocked the single worker until even n=1 requests hit MLflow's 60 s timeout
# (HTTP 504), and the server grew to 3 GB. Larger batches belong to `aigc generate`.
MAX_SERVED_IMAGES = 1024


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """(n, seed, label?) rows -> uint8 images; the generator is rebuilt from its file on load."""

    def load_context(self, context: Any) -> None:
        from aigc.models import load_generator

        self.G, self.cfg = load_generator(context.artifacts["generator"])
        self.evaluator_path = context.artifacts.get("evaluator")
        self._evaluator = None

    def evaluator(self) -> Any:
        """The classifier for labelled requests, loaded on the first one: a model serves
        unlabelled requests even when its evaluator file no longer loads."""
        if self._evaluator is None and self.evaluator_path:
            from aigc.metrics.evaluator import load_evaluator

            try:
                self._evaluator = load_evaluator(self.evaluator_path)
            except (RuntimeError, KeyError, TypeError) as exc:  # saved by an incompatible aigc version
                raise UserError(f"this model's evaluator does not load with the installed aigc "
                                f"({type(exc).__name__}); labelled requests are unavailable") from None
        return self._evaluator

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        from aigc.sampling import generate_uint8

        from aigc.sampling import check_request

        images = []
        try:
            rows = []
            for row in model_input.to_dict("records"):
                n, seed = whole(row["n"], "n"), whole(row["seed"], "seed")
                check_request(n, seed, MAX_SERVED_IMAGES)  # the bound it states is the one enforced below
                rows.append((n, seed, whole(row["label"], "label") if "label" in row else None))
            total = sum(n for n, _, _ in rows)
            if total > MAX_SERVED_IMAGES:
                raise UserError(f"{total} images asked for in one request; the served model makes at most "
                                f"{MAX_SERVED_IMAGES} per request: split it into several, or use aigc generate "
                                f"for large batches")
            for n, seed, label in rows:
                # Only an unconditional generator needs the classifier to honour a label.
                evaluator = self.evaluator() if label is not None and not self.cfg.conditional else None
                images.append(generate_uint8(self.G, self.cfg, n, seed, label, evaluator))
        except UserError as exc:  # the client's request is wrong: HTTP 400 with the message, not a 500
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        if not images:
            c, h, w = self.cfg.image_shape
            return np.zeros((0, h, w, c), np.uint8)
        return np.concatenate(images)


def whole(value: Any, key: str) -> int:
    """A request's ``n``, ``seed`` or ``label`` as an int; a fraction, text, a boolean or a null is
    the client's mistake (HTTP 400 naming it), never silently rounded."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if ok and isinstance(value, (float, np.floating)):
        ok = math.isfinite(value) and float(value).is_integer()
    if not ok:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            hint = "; leave the label column out for any class" if key == "label" else ""
            raise UserError(f"{key} is null: give a whole number{hint}")
        raise UserError(f"{key} = {value!r}: must be a whole number")
    return int(value)


def signature(cfg: NetConfig) -> ModelSignature:
    """Inputs n, seed, label (optional); output uint8 images (N, H, W, C) of the generator's size.

    The columns are typed ``Any``: with ``long`` MLflow's scoring server casts the request to the
    column type before the model sees it, so ``n = 2.5`` became 2 and was served. ``whole`` checks
    the values instead, and refuses what is not a whole number."""
    inputs = Schema([ColSpec(AnyType(), "n"), ColSpec(AnyType(), "seed"), ColSpec(AnyType(), "label", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, cfg.height, cfg.width, cfg.channels))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example() -> pd.DataFrame:
    return pd.DataFrame({"n": [4], "seed": [0]})


def pip_requirements() -> list[str]:
    """The served model's requirements, pinned exactly as aigc's own (pyproject.toml), plus aigc.

    Given explicitly: MLflow's inference costs ~11 s (docs/development.md, "The stack"). aigc is a local package, not on
    PyPI, so serve with ``--env-manager local`` from the project's environment.
    """
    pins = {}
    for req in requires("aigc") or []:
        name = req.split(";")[0].split("==")[0].strip()
        if ";" not in req and name.lower() in {p.lower() for p in SERVING_PACKAGES}:
            pins[name.lower()] = req.strip()
    out = []
    for name in SERVING_PACKAGES:
        if name.lower() in pins:
            out.append(pins[name.lower()])
        else:
            try:
                out.append(f"{name}=={version(name).split('+')[0]}")
            except PackageNotFoundError:
                out.append(name)
    return out + [f"aigc=={version('aigc')}"]


# The model this file defines, for MLflow's models-from-code: register logs CODE_PATH, and MLflow
# runs this file (as a copy stored in the model) to get the model when it is loaded or served.
CODE_PATH = Path(__file__)
mlflow.models.set_model(GeneratorModel())
