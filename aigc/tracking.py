"""The one place that talks to MLflow.

Library code reports through plain hooks (``aigc.training.StepWindow``, grids as arrays);
this module turns them into MLflow calls. One training = one MLflow run.

The store is ``tracking.uri`` from params.yaml (a local SQLite file by default) unless
``MLFLOW_TRACKING_URI`` is set, which wins, as MLflow users expect.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Offline and quiet, whoever imports us first (stack.md); a user's own setting wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
# A dead server should fail in seconds, not after MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from aigc.config import TrackingConfig  # noqa: E402
from aigc.errors import UserError  # noqa: E402

MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
MAX_PARAM_LEN = 6000


def resolve_uri(cfg: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri


def _check_reachable(uri: str) -> None:
    """Fail fast, with advice, when a tracking server or a SQLite folder is not there."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as exc:
            raise UserError(
                f"MLflow tracking server {uri} is not reachable ({type(exc).__name__}). Start it "
                f"(mlflow server --backend-store-uri ... --host ... --port ...), or unset MLFLOW_TRACKING_URI "
                f"to use the local store in params.yaml (tracking.uri)"
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.exists():
            raise UserError(f"MLflow tracking URI {uri}: folder {db.parent} does not exist; create it or fix tracking.uri")


def git_commit() -> str | None:
    """The current commit, with '-dirty' when tracked files differ from it; None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


class Run:
    """One MLflow run. ``Run.disabled()`` gives one that records nothing (tracking.enabled: false)."""

    def __init__(self, client: MlflowClient | None, run_id: str | None, experiment_id: str | None, uri: str | None):
        self.client, self.run_id, self.experiment_id, self.uri = client, run_id, experiment_id, uri

    @classmethod
    def disabled(cls) -> "Run":
        return cls(None, None, None, None)

    @classmethod
    def start(cls, cfg: TrackingConfig, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> "Run":
        """Create (if needed) the experiment and start a run with its params and tags."""
        if not cfg.enabled:
            return cls.disabled()
        uri = resolve_uri(cfg)
        _check_reachable(uri)
        try:
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(cfg.experiment)
            if exp is None:
                # An explicit artifact location: MLflow's default for SQLite stores is ./mlruns,
                # which MLflow itself later mistakes for an old file store.
                root = cfg.artifact_root
                location = root if "://" in root else Path(root).resolve().joinpath(cfg.experiment).as_uri()
                exp_id = client.create_experiment(cfg.experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            run = client.create_run(exp_id, run_name=run_name, tags=tags)
        except MlflowException as exc:
            raise UserError(f"MLflow tracking store {uri} refused the run: {exc.message}") from None
        self = cls(client, run.info.run_id, exp_id, uri)
        self.log_params(params)
        return self

    @property
    def active(self) -> bool:
        return self.client is not None

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metric_rows(self, rows: Iterable[tuple[str, float, int]]) -> None:
        """Many (key, value, step) in as few calls as MLflow allows."""
        if not self.active:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(s)) for k, v, s in rows]
        for i in range(0, len(metrics), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_BATCH])

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self.log_metric_rows((k, v, step or 0) for k, v in values.items())

    def log_image(self, image, key: str, step: int) -> None:
        """An image series (the MLflow UI shows it with a step slider)."""
        if self.active:
            self.client.log_image(self.run_id, image, key=key, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, ok: bool) -> None:
        if self.active:
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def info(self) -> dict[str, Any]:
        """What later stages need to find this run again (written to the run file)."""
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.uri}
