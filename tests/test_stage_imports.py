"""Each stage is its own process (DVC runs one per stage): what a stage imports and does not use
is start-up time paid on every run. These keep the heavy libraries out of the stages that do not
need them (issue 15: orchestration and tracking within 5% of a default run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

HEAVY = ("sklearn", "torchmetrics", "great_expectations", "prefect", "mlflow", "torch", "matplotlib.pyplot")

# stage -> heavy libraries it may import when loaded (prefect comes later, with the flow)
ALLOWED = {
    "ingest": set(),
    "preprocess": set(),  # sklearn only inside the split
    "train_evaluator": {"torch"},
    "train": {"torch", "mlflow"},
    "evaluate": {"torch", "mlflow"},
}


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_a_stage_loads_only_what_it_uses(stage: str):
    code = (f"import sys, json; import pipeline.{stage}; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert loaded <= ALLOWED[stage], f"pipeline.{stage} imports {sorted(loaded - ALLOWED[stage])} at load time"
