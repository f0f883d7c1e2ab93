"""The data-quality and privacy gate end to end: a real ``dvc repro`` in a throwaway copy of the
project, on a folder of 8x8 digits whose metadata.csv carries planted personal data and half of
whose images carry a planted row of pixels (a byte pattern no digit has).

No planted metadata value may appear anywhere under the validated and processed data, the models,
the reports or the MLflow store; then a bad label stops ``dvc repro`` at the gate with one line and
nothing downstream changes. Last, every copy of a record: without encryption the planted pixels
are found in clear in the processed splits, the DVC cache, a DVC remote, the reports (git's
objects) and MLflow's artifacts; in a second project run with ``privacy.encrypt_at_rest`` from the
start, neither they nor the planted metadata are found anywhere: the workspace (but the user's
own source folder), ``.dvc/cache``, the remote, ``mlartifacts/``, ``mlflow.db`` and git's objects,
searched as bytes, as float32 pixels and inside every PNG (decoded, also the ones inlined in HTML
pages). (A missing or wrong key and a tampered file: tests/test_encryption.py.)
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
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
# The bottom row of every other image: 8 distinct grey levels, none a multiple of 16 (the digits'
# own levels are), so neither a digit nor one epoch of a generator draws it by chance.
PATTERN = np.array([7, 250, 33, 201, 90, 163, 12, 229], np.uint8)
NEEDLES = {"uint8 pixels": PATTERN.tobytes(),  # raw snapshots (images.npy), decoded PNG rows
           "float32 pixels": ((PATTERN.astype(np.float32) / 127.5) - 1.0).tobytes()}  # processed splits


def write_digits_folder(root: Path) -> None:
    """scikit-learn's digits as PNGs in label folders (every other one with the planted pixel row),
    and a metadata.csv with planted PII."""
    ds = load_source(DataConfig(source="digits"))
    rows = []
    for i, (im, y) in enumerate(zip(ds.images[..., 0], ds.labels)):
        rel = f"{y}/{i:04d}.png"
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        if i % 2 == 0:
            im = im.copy()
            im[-1] = PATTERN
        Image.fromarray(im).save(root / rel)
        rows.append({"file": rel,
                     "contributor_email": PLANTED["email"] if i % 50 == 0 else "",
                     "author": PLANTED["author"] if i % 7 == 0 else "",
                     "comment": (f"scanned; call {PLANTED['phone']}, ref {PLANTED['ssn']}" if i == 30
                                 else "scanned at the lab"),
                     "scanner": "flatbed-2"})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)


def build(root: Path, env: dict[str, str] | None = None, **values: object) -> Path:
    """A project copy at ``root`` on the planted folder, one epoch, run with ``dvc repro`` (``env``: extra
    environment, the data key); then its reports committed to git and its DVC outputs pushed to a remote."""
    copy_project(root)
    write_digits_folder(root / "data/source/planted")
    set_params(root, {"data.source": "folder", "data.path": "data/source/planted", "train.epochs": 1,
                      "evaluator.epochs": 1, "evaluate.num_samples": 400, **values})
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                 ["dvc", "repro"], ["dvc", "remote", "add", "-d", "store", str(root.parent / f"{root.name}-remote")],
                 ["dvc", "push", "-q"], ["git", "add", "-A"],
                 ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "run"]):
        res = run_module(args, root, env=env)
        assert res.returncode == 0, f"{' '.join(args)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("pii-project") / "p")


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


# --- every copy of a record: found in clear without encryption, nowhere with it ----------------------

def _png_has_pattern(blob: bytes) -> bool:
    """Whether a PNG shows the planted row: any row of any channel, runs of equal pixels collapsed
    (the grids and thumbnails scale records up by whole factors)."""
    try:
        im = np.asarray(Image.open(io.BytesIO(blob)))
    except Exception:
        return False
    im = im.reshape(*im.shape[:2], -1)
    for c in range(im.shape[2]):
        for row in im[..., c].astype(np.uint8):
            if NEEDLES["uint8 pixels"] in row[np.r_[True, row[1:] != row[:-1]]].tobytes():
                return True
    return False


def found_in(blob: bytes) -> list[str]:
    """What of the planted records ``blob`` holds in clear: the pixel row (as bytes, as float32, in a
    PNG, in a PNG inlined in an HTML page) or a planted metadata value."""
    found = [name for name, needle in NEEDLES.items() if needle in blob]
    pngs = [blob] if blob.startswith(b"\x89PNG") else []
    pngs += [base64.b64decode(m) for m in re.findall(rb"data:image/png;base64,([A-Za-z0-9+/=]+)", blob)]
    if any(_png_has_pattern(p) for p in pngs):
        found.append("pixels in a picture")
    text = blob.decode("utf-8", "replace").lower()
    return found + [f"metadata {v!r}" for v in [*PLANTED.values(), "hopper", "555 0147"] if v.lower() in text]


def git_objects(root: Path) -> list[tuple[str, bytes]]:
    """Every object in git's store, decompressed (loose and packed alike)."""
    out = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=root, capture_output=True,
                         check=True).stdout
    objects, at = [], 0
    while at < len(out):
        end = out.index(b"\n", at)
        sha, _, size = out[at:end].split()
        objects.append((f"git object {sha.decode()}", out[end + 1:end + 1 + int(size)]))
        at = end + 1 + int(size) + 1
    return objects


def search(root: Path) -> dict[str, list[str]]:
    """{place: what of the planted records it holds in clear} over the workspace (but the user's own
    source folder and git's compressed store), .dvc/cache, the DVC remote and git's objects."""
    remote = root.parent / f"{root.name}-remote"
    files = [f for f in [*root.rglob("*"), *remote.rglob("*")] if f.is_file()
             and not f.is_relative_to(root / "data/source") and not f.is_relative_to(root / ".git")]
    assert any(f.is_relative_to(remote) for f in files) and any(f.is_relative_to(root / ".dvc/cache") for f in files)
    assert any(f.is_relative_to(root / "mlartifacts") for f in files) and (root / "mlflow.db").is_file()
    blobs = [(str(f.relative_to(root.parent)), f.read_bytes()) for f in files] + git_objects(root)
    return {where: hit for where, blob in blobs if (hit := found_in(blob))}


def test_without_encryption_every_copy_of_a_record_is_in_clear(project: Path):
    shutil.rmtree(project / "data/source/planted/11", ignore_errors=True)  # the bad class of the test above
    places = search(project)
    # the search can find them: the pixel row in every kind of copy, the metadata in the raw snapshot
    for where, what in (("p/data/processed/train.npz", "float32 pixels"), ("p/data/raw/images.npy", "uint8 pixels"),
                        ("p/reports/data_quality/report.html", "pixels in a picture")):
        assert what in places.get(where, []), (where, places.get(where))
    for prefix in ("p/.dvc/cache/", "p-remote/", "p/mlartifacts/", "git object"):
        assert any(w.startswith(prefix) and any("pixels" in h for h in hit) for w, hit in places.items()), prefix
    assert any(w.startswith("p-remote/") and any("metadata" in h for h in hit) for w, hit in places.items())


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same run with ``privacy.encrypt_at_rest`` from the start; the key file outside the project."""
    key_file = tmp_path_factory.mktemp("key") / "data.key"
    key_file.write_text(generate_key() + "\n")
    root = build(tmp_path_factory.mktemp("encrypted-project") / "p", env={KEY_FILE_ENV: str(key_file)},
                 **{"privacy.encrypt_at_rest": True})
    return root, key_file


def test_encrypted_at_rest_no_copy_of_a_record_is_in_clear_anywhere(encrypted: tuple[Path, Path]):
    root, key_file = encrypted
    for folder, names in (("data/raw", ["images.npy.enc", "labels.npy.enc", "metadata.csv.enc"]),
                          ("data/validated", ["images.npy.enc", "labels.npy.enc", "metadata.csv.enc"]),
                          ("data/processed", ["dataset.json", "test.npz.enc", "train.npz.enc"])):
        assert sorted(p.name for p in (root / folder).iterdir()) == names, folder
    assert search(root) == {}
    key = key_file.read_text().strip().encode()
    assert not [f for f in root.rglob("*") if f.is_file() and key in f.read_bytes()]
    # what stands in for the records: the pictures say so, the scores are still there
    assert "Pictures withheld" in (root / "reports/data_quality/report.html").read_text()
    assert "the grey checkerboard stands in for each training image" in (root / "reports/run.html").read_text()
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["records_withheld"] is True and 0 <= metrics["copy_share"] <= 1
