"""The divergence guard through the real train stage: one error line, a FAILED MLflow run, no files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from aigc.config import DataConfig
from aigc.data.preprocess import preprocess, save_processed
from aigc.data.sources import load_source
from tests.conftest import ROOT, run_module


@pytest.mark.slow  # a stage process with its own Prefect server: 20-90 s here
def test_forced_nan_fails_the_stage_and_writes_nothing(tmp_path: Path, sqlite_uri: str):
    processed = tmp_path / "processed"
    save_processed(preprocess(load_source(DataConfig(source="digits")), DataConfig(), seed=0), processed)
    with np.load(processed / "train.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["images"] = arrays["images"].copy()
    arrays["images"][100] = np.nan  # one poisoned image: the first batch it lands in gives NaN losses
    np.savez(processed / "train.npz", **arrays)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "seed": 0, "train": {"epochs": 2}, "runtime": {"log_every": 5, "threads": 1},
        "tracking": {"uri": sqlite_uri, "experiment": "guard", "artifact_root": str(tmp_path / "art")}}))
    out = {k: tmp_path / "out" / k for k in ("generator", "checkpoint", "run", "metrics", "losses", "samples")}
    args = ["-m", "pipeline.train", "--params", str(params), "--processed", str(processed)]
    for key, path in out.items():
        args += [f"--{key}", str(path)]

    proc = run_module(args, cwd=ROOT)

    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert errors[0].startswith("error: training diverged at step ") and "= nan" in errors[0]
    step = int(errors[0].split("at step ")[1].split()[0])
    assert 1 <= step <= 1617 // 64  # within the first epoch: the poisoned image is in it
    # no generator, run file or report; the checkpoint is the resumable state before the first epoch
    assert not any(p.exists() for k, p in out.items() if k != "checkpoint")
    state = torch.load(out["checkpoint"], weights_only=True)
    assert state["epoch"] == 0 and not state["complete"]
    client = MlflowClient(sqlite_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("guard").experiment_id])
    assert run.info.status == "FAILED"
