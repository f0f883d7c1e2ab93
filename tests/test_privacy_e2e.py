"""The data-quality and privacy gate end to end: a real ``dvc repro`` in a throwaway copy of the
project, on a folder of 8x8 digits whose metadata.csv carries planted personal data.

No planted value may appear anywhere under the validated and processed data, the models, the
reports or the MLflow store; then a bad label stops ``dvc repro`` at the gate with one line and
nothing downstream changes. Last, with ``privacy.encrypt_at_rest`` the raw and validated snapshots
are re-written encrypted, and the DVC cache (after ``dvc gc``) holds none of the planted values in
clear -- where without encryption it held them in the raw snapshot's metadata.csv. (A missing or
wrong key and a tampered file: tests/test_encryption.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from aigc.config import DataConfig
from aigc.data.sources import load_source
from aigc.encryption import KEY_FILE_ENV, generate_key
from tests.conftest import copy_project, run_module, set_params
from tests.test_e2e import sh

pytestmark = pytest.mark.slow

PLANTED = {
    "email": "grace.hopper@navy.example.mil",
    "author": "Grace Brewster Hopper",
    "phone": "+1 202 555 0147",
    "ssn": "078-05-1120",
}
SCANNED = ["data/validated", "data/processed", "models", "reports", "mlflow.db", "mlartifacts"]


def write_digits_folder(root: Path) -> None:
    """scikit-learn's digits as PNGs in label folders, and a metadata.csv with planted PII."""
    ds = load_source(DataConfig(source="digits"))
    rows = []
    for i, (im, y) in enumerate(zip(ds.images[..., 0], ds.labels)):
        rel = f"{y}/{i:04d}.png"
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / rel)
        rows.append({"file": rel,
                     "contributor_email": PLANTED["email"] if i % 50 == 0 else "",
                     "author": PLANTED["author"] if i % 7 == 0 else "",
                     "comment": (f"scanned; call {PLANTED['phone']}, ref {PLANTED['ssn']}" if i == 30
                                 else "scanned at the lab"),
                     "scanner": "flatbed-2"})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pii-project")
    copy_project(root)
    write_digits_folder(root / "data/source/planted")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source="folder", path="data/source/planted")
    params["train"]["epochs"] = 1
    for section, key, value in (("evaluator", "epochs", 1), ("evaluate", "num_samples", 400)):
        if section in params:  # the evaluation stages, when present: as small as tests/test_e2e.py has them
            params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], root)
    sh(["dvc", "init", "-q"], root)
    sh(["dvc", "config", "core.analytics", "false"], root)
    sh(["dvc", "repro"], root)
    return root


def scanned_text(project: Path) -> str:
    files = []
    for name in SCANNED:
        p = project / name
        files += [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    assert len(files) > 10, files
    return "\n".join(f.read_bytes().decode("utf-8", "replace") for f in files).lower()


def test_planted_pii_is_scrubbed_and_reaches_no_output(project: Path):
    summary = json.loads((project / "reports/data_quality/summary.json").read_text())
    assert summary["passed"] is True
    found = summary["privacy"]["found"]
    assert found["contributor_email"]["kinds"] == ["email"]
    assert found["author"]["kinds"] == ["person_name"]
    assert set(found["comment"]["kinds"]) == {"phone", "national_id"}
    assert {c: f["action"] for c, f in found.items()} == {"contributor_email": "drop", "author": "drop",
                                                          "comment": "drop"}
    assert "scanner" in pd.read_csv(project / "data/validated/metadata.csv").columns  # not personal: kept
    # the planted values were there to be found ...
    raw_meta = (project / "data/raw/metadata.csv").read_text().lower()
    assert all(v.lower() in raw_meta for v in PLANTED.values())
    # ... and appear nowhere downstream of the gate
    text = scanned_text(project)
    for value in [*PLANTED.values(), "hopper", "555 0147"]:
        assert value.lower() not in text, value
    assert (project / "models/generator.pt").exists()


def test_the_validate_stage_has_its_own_mlflow_run_with_the_report(project: Path):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aigc")
    [run] = client.search_runs([exp.experiment_id], filter_string="tags.`aigc.stage` = 'validate'")
    assert run.info.run_name.startswith("validate-") and run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "data_quality")} == {
        "data_quality/summary.json", "data_quality/report.html"}


def test_a_failing_expectation_stops_repro_and_nothing_downstream_changes(project: Path):
    watched = ["data/processed/train.npz", "models/generator.pt", "data/validated/metadata.csv"]
    before = {p: (project / p).read_bytes() for p in watched}
    bad = project / "data/source/planted/11"
    bad.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * (i + 1), np.uint8)).save(bad / f"x{i}.png")
    res = sh(["dvc", "repro"], project, ok=False)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert errors[0].startswith("error: data-quality gate failed: labels: labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11], "
                                "bound 0..9 (validate.max_label)"), errors[0]
    assert "first offending records (id): " in errors[0] and "report: reports/data_quality/report.html" in errors[0]
    assert "Traceback" not in res.stderr + res.stdout
    summary = json.loads((project / "reports/data_quality/summary.json").read_text())
    assert summary["passed"] is False and summary["expectations"]["labels"]["offending"] == 3
    for p in watched[:2]:
        assert (project / p).read_bytes() == before[p], p
    assert not (project / "data/validated").exists() or (
        (project / "data/validated/metadata.csv").read_bytes() == before["data/validated/metadata.csv"])


def cache_text(project: Path) -> str:
    files = [f for f in (project / ".dvc/cache").rglob("*") if f.is_file()]
    assert files
    return "\n".join(f.read_bytes().decode("utf-8", "replace") for f in files).lower()


def test_encrypted_at_rest_the_dvc_cache_holds_no_planted_value(project: Path, tmp_path: Path):
    shutil.rmtree(project / "data/source/planted/11", ignore_errors=True)  # the bad class of the test above
    # encryption off: the raw snapshot's metadata.csv sits in the DVC cache (and any remote) in clear
    assert PLANTED["email"].lower() in cache_text(project)

    key_file = tmp_path / "data.key"  # outside the project
    key_file.write_text(generate_key() + "\n")
    set_params(project, {"privacy.encrypt_at_rest": True})
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", KEY_FILE_ENV: str(key_file)}
    for args in (["dvc", "repro", "validate"], ["dvc", "gc", "--workspace", "--force"]):
        res = run_module(args, project, env=env)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for folder in ("data/raw", "data/validated"):
        assert sorted(p.name for p in (project / folder).iterdir()) == [
            "images.npy.enc", "labels.npy.enc", "metadata.csv.enc"], folder
    text = cache_text(project)
    for value in [*PLANTED.values(), "hopper", "555 0147"]:
        assert value.lower() not in text, value
    assert key_file.read_text().strip().lower() not in text + (project / "dvc.lock").read_text().lower()
