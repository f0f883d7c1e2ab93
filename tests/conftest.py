"""Shared fixtures: an offline, quiet environment and tiny datasets the tests write themselves."""

from __future__ import annotations

import glob
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from aigc import environment

ROOT = Path(__file__).resolve().parents[1]

# The range each headline score and its floor can take (docs/evaluation.md); "classes" stands for
# the data's number of classes (is, modes). kid is an unbiased estimate: a little below 0 by chance.
SCORE_RANGES: dict[str, tuple[float, float | str]] = {
    "fid": (0.0, math.inf), "kid": (-1.0, math.inf), "is": (1.0, "classes"), "precision": (0.0, 1.0),
    "recall": (0.0, 1.0), "density": (0.0, math.inf), "coverage": (0.0, 1.0), "modes": (0.0, "classes"),
    "class_kl": (0.0, math.inf), "dcr_score": (0.0, math.inf), "copy_share": (0.0, 1.0),
    "label_accuracy": (0.0, 1.0)}


def assert_score(metrics: dict, name: str, floor: bool = True) -> None:
    """``metrics[name]`` (and its ``_floor``) is a finite number in the score's range: a NaN, an
    infinity or a value no generator can reach is a broken score, not a result."""
    lo, hi = SCORE_RANGES[name]
    top = float(metrics.get("classes") or math.inf) if hi == "classes" else hi
    for key in (name, f"{name}_floor") if floor else (name,):
        v = metrics[key]
        assert isinstance(v, (int, float)) and not isinstance(v, bool), (key, v)
        if key == "dcr_score" and math.isnan(v):
            # the one documented NaN (aigc/metrics/memorisation.py, dcr_ratio): every held-out image
            # is closer to the training set than to the other held-out ones (p0 = 1), so the ratio
            # has no room to measure -- seen on tiny test splits (16 images), never otherwise
            assert metrics["dcr_closer_to_train_floor"] == 1.0, (key, v, metrics["dcr_closer_to_train_floor"])
            continue
        assert math.isfinite(v) and lo - 1e-6 <= v <= top + 1e-6, (key, v)

# Offline and quiet (aigc.environment, the one place), and never the user's own tracking server.
environment.apply()
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
for _key in ("AIGC_TLS_CA", "AIGC_TLS_CERT", "AIGC_TLS_KEY"):  # the services' tests make their own local CA
    os.environ.pop(_key, None)


@pytest.fixture(scope="session", autouse=True)
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Prefect home for the session: its database is migrated once, not per test."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session", autouse=True)
def probe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The speed probe's per-machine cache (aigc/runtime.py) in the session's own folder, never ~/.cache."""
    folder = tmp_path_factory.mktemp("aigc-cache")
    os.environ["AIGC_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    """A real, empty MLflow store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def digit_images(n: int = 40, size: int = 8, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Distinct, non-blank uint8 images (N, size, size) and balanced labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % classes
    return images, labels


PROJECT_FILES = ["aigc", "pipeline", "dvc.yaml", "params.yaml", ".gitignore", "data/source/README.md"]


def copy_project(root: Path) -> Path:
    """A throwaway copy of the project (code, pipeline, params) at ``root``, for real ``dvc repro`` runs."""
    import shutil

    for name in PROJECT_FILES:
        src, dst = ROOT / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    return root


TINY = {"data.source": "digits", "train.epochs": 1, "evaluator.epochs": 1, "evaluate.num_samples": 400}


def set_params(root: Path, values: dict[str, object]) -> None:
    """Write dotted ``values`` (``{"train.epochs": 1}``) into ``root/params.yaml``."""
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in values.items():
        *sections, key = dotted.split(".")
        node = params
        for name in sections:  # nested sections too: evaluator.contrastive.epochs
            node = node[name]
        node[key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def tiny_project(root: Path, **extra: object) -> Path:
    """A project copy at ``root`` set for a fast real run: 8x8 digits, one epoch, 400 samples."""
    copy_project(root)
    set_params(root, TINY | {k.replace("__", "."): v for k, v in extra.items()})
    return root


def run_module(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    """Run ``python -m ...`` (or a console tool) in a subprocess, capturing its output."""
    import subprocess

    full_env = os.environ | (env or {})
    cmd = [sys.executable, *args] if args[0] == "-m" else args
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def sh(args: list[str], cwd: Path, ok: bool = True, timeout: int = 900):
    """``run_module`` with the venv's tools first on PATH (dvc, aigc); asserts success unless ``ok=False``."""
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    res = run_module(args, cwd=cwd, env=env, timeout=timeout)
    if ok:
        assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


# --- system engines the slow tests start for real: a missing one skips with one line saying what to install ---

def _sshd() -> str | None:
    return shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


def _initdb() -> str | None:
    return shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)


ENGINES = {
    "sshd": (_sshd, "OpenSSH's sshd not found: apt-get install openssh-server (as .ci/run does)"),
    "postgres": (_initdb, "PostgreSQL's initdb not found: apt-get install postgresql (as .ci/run does)"),
}


def require(engine: str) -> None:
    """Skip the calling test (or fixture) when the system engine ``engine`` is not installed."""
    find, why = ENGINES[engine]
    if find() is None:
        pytest.skip(why)
