"""The one place that talks to MLflow.

Library code reports through plain hooks (``aigc.training.StepWindow``, grids as arrays);
this module turns them into MLflow calls. One training = one MLflow run. The model registry
(``Registry``: versions, their tags, the ``champion`` alias) lives here too; the decision of
what to promote is plain logic in ``aigc/registry.py``.

A training's run can be *buffered* (``Run.buffer``): its calls then go, in order, through a
background outbox that retries each with exponential backoff while the server does not answer,
so a tracking server that restarts mid-run costs the curves nothing and training never waits
on it. ``end`` waits at most ``tracking.retry_seconds`` of outage for the outbox to drain and
says what did not arrive. A run is re-opened after a kill (``Run.reopen``): what MLflow already
holds is read back (each metric's last step, each image series' last step, kept as the run tag
``aigc.logged.image.<key>``), so the resumed stage sends every missing value once and nothing
twice.

The store is ``tracking.uri`` from params.yaml (a local SQLite file by default) unless
``MLFLOW_TRACKING_URI`` is set, which wins, as MLflow users expect. That choice is made once
(``resolve_uri``) and then travels as an explicit ``MlflowClient``/URI: nothing here sets MLflow's
module-level tracking URI or writes ``os.environ``, so two stores in one process (a shared server
and a local file, an earlier run's store) never get mixed up.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigc import environment

environment.apply()  # offline and quiet before MLflow loads (aigc/environment.py, the one place)

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from aigc.config import TrackingConfig  # noqa: E402
from aigc.errors import UserError  # noqa: E402

MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
LOCK_SUFFIX = ".alias-lock"  # Registry.lock: the registered model "<name>.alias-lock" is the mutex
LOCK_TOKEN_TAG = "aigc.lock.token"
LOCK_TIMEOUT_S = 300.0
LOCK_STALE_S = 60.0
MAX_PARAM_LEN = 6000
# The experiment holds model training (MLflow 3.17 reads this tag when it picks an experiment's
# default tab; its GenAI/Model training switch itself is a per-browser setting: README).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def workspace_root(cwd: Path | None = None) -> Path | None:
    """The project folder when this process runs in a queued DVC experiment's temporary copy
    (``dvc exp run --queue``; ``dvc queue start`` runs it in ``<project>/.dvc/tmp/exps/tmpXXXX``
    and deletes the copy afterwards); None elsewhere."""
    parts = (cwd or Path.cwd()).resolve().parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return None


def resolve_uri(cfg: TrackingConfig) -> str:
    """``MLFLOW_TRACKING_URI``, else ``tracking.uri``. A relative SQLite store (the default
    ``sqlite:///mlflow.db``) is the project's: inside a queued experiment's temporary copy it is
    made absolute against the project, or the experiment's runs and registered models would be
    written into the copy and deleted with it."""
    return project_uri(os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri)


def project_uri(uri: str) -> str:
    """``uri`` as this project means it: a relative SQLite store inside a queued experiment's
    temporary copy is the project's (a run file written by ``dvc repro`` names it relatively too)."""
    root = workspace_root()
    if root is not None and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{root / uri.removeprefix('sqlite:///')}"
    return uri


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
        _check_signed_in(uri)
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.exists():
            raise UserError(f"MLflow tracking URI {uri}: folder {db.parent} does not exist; create it or fix tracking.uri")


def _check_signed_in(uri: str) -> None:
    """A server with authentication (MLflow's basic-auth app) refuses anonymous clients and wrong
    passwords: say so in one line, with what to set, instead of MLflow's 401 deep in a stage.
    The credentials are the ones MLflow itself reads (MLFLOW_TRACKING_USERNAME/PASSWORD or
    MLFLOW_TRACKING_TOKEN)."""
    import requests

    user, password, token = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD", "TOKEN"))
    try:
        res = requests.get(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                           auth=(user, password) if user and password else None,
                           headers={"Authorization": f"Bearer {token}"} if token and not user else None, timeout=10)
    except requests.RequestException:
        return  # reachable a moment ago (/health); MLflow's own retries and errors take it from here
    if res.status_code == 401:
        given = f"user {user!r} and its password were refused" if user else "no user name and password were given"
        raise UserError(f"MLflow tracking server {uri} requires authentication and {given} (HTTP 401): export "
                        f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (make services writes them to "
                        f".services/mlflow.env), or ask the server's admin for an account")
    if res.status_code == 403:
        raise UserError(f"MLflow tracking server {uri}: user {user!r} may not read experiments (HTTP 403); "
                        f"ask the server's admin for READ or EDIT permission")


def artifact_location(cfg: TrackingConfig, uri: str) -> str | None:
    """Where a new experiment keeps its artifacts. A tracking server decides for itself (None):
    with ``--artifacts-destination`` it proxies them (``mlflow-artifacts:/``), so clients need no
    access to the store -- a local folder here would be this machine's, wrong for every teammate.
    A local store gets ``tracking.artifact_root`` (a folder, resolved; or a URI such as s3://...)."""
    root = cfg.artifact_root
    if "://" in root:
        return root
    if uri.startswith(("http://", "https://")):
        return None
    # in a queued experiment's temporary copy, the project's folder (resolve_uri)
    return (workspace_root() or Path.cwd()).joinpath(root).resolve().joinpath(cfg.experiment).as_uri()


def _create_experiment(client: MlflowClient, cfg: TrackingConfig, uri: str) -> str:
    """Create the experiment; if a teammate's pipeline created it a moment ago, use theirs."""
    try:
        return client.create_experiment(cfg.experiment, artifact_location=artifact_location(cfg, uri),
                                        tags=EXPERIMENT_KIND)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := client.get_experiment_by_name(cfg.experiment)) is None:
            raise
        return exp.experiment_id


def git_commit() -> str | None:
    """The current commit, with '-dirty' when tracked files differ from it; None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def _transient(exc: Exception) -> bool:
    """A failure worth retrying: the server unreachable or failing (5xx), not a refusal (4xx)."""
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return True  # connection errors, timeouts, an OSError on the way


class Outbox:
    """MLflow calls made in order on a background thread; a call that fails for a transient
    reason (the server down or restarting) is retried with exponential backoff (0.5 s doubling
    to 30 s) until it succeeds. It never gives up while the run goes on; once closed, it stops
    when the queue is empty or an outage has lasted ``retry_seconds``."""

    def __init__(self, retry_seconds: float) -> None:
        self.retry_seconds = retry_seconds
        self._queue: deque[tuple[str, Callable[[], Any]]] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self.down_since: float | None = None  # monotonic time of the first failure of the current outage
        self.last_error = ""
        self.refused: list[str] = []  # calls the server refused outright (4xx): not retried
        self.outages = 0
        self._thread = threading.Thread(target=self._work, name="aigc-mlflow-outbox", daemon=True)
        self._thread.start()

    def put(self, what: str, call: Callable[[], Any]) -> None:
        with self._cv:
            self._queue.append((what, call))
            self._cv.notify_all()

    def _work(self) -> None:
        delay = 0.5
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                what, call = self._queue[0]
            try:
                call()
            except Exception as exc:  # noqa: BLE001 -- whatever the transport raised, the call waits
                with self._cv:
                    if not _transient(exc):
                        self._queue.popleft()
                        self.refused.append(f"{what}: {getattr(exc, 'message', exc)}")
                        continue
                    now = time.monotonic()
                    if self.down_since is None:
                        self.down_since, self.outages = now, self.outages + 1
                    self.last_error = f"{type(exc).__name__}"
                    if self._closing:
                        left = self.retry_seconds - (now - self.down_since)
                        if left <= 0:
                            return  # given up: the queue keeps what did not arrive
                        self._cv.wait(min(delay, left))
                    else:
                        self._cv.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            with self._cv:
                self._queue.popleft()
                self.down_since, delay = None, 0.5

    def close(self) -> list[str]:
        """Wait for the queue to drain (or an outage to outlast ``retry_seconds``); returns what
        did not arrive."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()  # a waiting retry goes now
        self._thread.join()
        return [what for what, _ in self._queue]


def describe_pending(pending: list[str]) -> str:
    """``["metrics:25", "image:samples", ...]`` -> '25 metric values, 1 sample grid, ...'."""
    counts: Counter[str] = Counter()
    for what in pending:
        kind, _, n = what.partition(":")
        counts[kind] += int(n) if kind == "metrics" else 1
    names = {"metrics": ("metric value", "metric values"), "image": ("image", "images"),
             "artifact": ("artifact", "artifacts"), "tags": ("tag update", "tag updates"),
             "status": ("the final run status", "the final run status")}
    return ", ".join(f"{n:,} {names[k][n != 1]}" if k != "status" else names[k][0] for k, n in counts.items())


class TrackingUnavailable(UserError):
    """The tracking server stayed away (longer than tracking.retry_seconds, or past MLflow's own
    retries in a stage that calls it directly); the stage's outputs are written."""


class Run:
    """One MLflow run. ``Run.disabled()`` gives one that records nothing (tracking.enabled: false)."""

    def __init__(self, client: MlflowClient | None, run_id: str | None, experiment_id: str | None, uri: str | None):
        self.client, self.run_id, self.experiment_id, self.uri = client, run_id, experiment_id, uri
        self.outbox: Outbox | None = None
        self._copies: list[Path] = []  # buffered artifacts' copies, removed when the outbox closes
        self.logged: dict[str, int] = {}  # a re-opened run: the last step MLflow holds per metric / image series

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
                exp_id = _create_experiment(client, cfg, uri)
            else:
                exp_id = exp.experiment_id
                kind, value = next(iter(EXPERIMENT_KIND.items()))
                if kind not in (exp.tags or {}):  # made by an older aigc, or by hand
                    client.set_experiment_tag(exp_id, kind, value)
            run = client.create_run(exp_id, run_name=run_name, tags=tags)
        except MlflowException as exc:
            raise UserError(f"MLflow tracking store {uri} refused the run: {exc.message}") from None
        self = cls(client, run.info.run_id, exp_id, uri)
        self.log_params(params)
        return self

    @classmethod
    def attach(cls, info: dict[str, Any], cfg: TrackingConfig) -> "Run":
        """Re-open the run a run file names (``info``: ``run_id``, ``tracking_uri``, as ``info()``
        wrote them), to log more into it: evaluation metrics go to the training's own run.

        Records nothing when tracking is off now or was off when the run file was written. The
        run lives where it was recorded, so the run file's URI is used; a dead server fails as
        ``start`` does.
        """
        if not cfg.enabled or not info.get("run_id"):
            return cls.disabled()
        uri = project_uri(info["tracking_uri"]) if info.get("tracking_uri") else resolve_uri(cfg)
        _check_reachable(uri)
        try:
            client = MlflowClient(tracking_uri=uri)
            run = client.get_run(info["run_id"])
        except MlflowException as exc:
            raise UserError(f"MLflow run {info['run_id']} (named by the run file) cannot be opened in {uri}: "
                            f"{exc.message}; retrain (dvc repro -f train) to record a new one") from None
        return cls(client, run.info.run_id, run.info.experiment_id, uri)

    @classmethod
    def reopen(cls, info: dict[str, Any], cfg: TrackingConfig) -> "Run | None":
        """Continue the run a checkpoint names after its process died: status back to RUNNING, and
        what it already holds read back so nothing is sent twice. None when the run is not in
        this store (another URI now, or deleted): the caller starts a new one."""
        uri = resolve_uri(cfg)
        if not cfg.enabled or not info.get("run_id") or info.get("tracking_uri") != uri:
            return None
        _check_reachable(uri)
        client = MlflowClient(tracking_uri=uri)
        try:
            run = client.get_run(info["run_id"])
        except MlflowException as exc:
            if exc.get_http_status_code() >= 500:
                raise UserError(f"MLflow tracking store {uri} failed: {exc.message}") from None
            return None
        if run.info.lifecycle_stage != "active":
            return None
        self = cls(client, run.info.run_id, run.info.experiment_id, uri)
        try:
            for key in run.data.metrics:
                self.logged[key] = max(m.step for m in client.get_metric_history(self.run_id, key))
            self.logged |= {k.removeprefix("aigc.logged."): int(v) for k, v in run.data.tags.items()
                            if k.startswith("aigc.logged.image.")}
            if run.info.status != "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
        except MlflowException as exc:
            raise UserError(f"MLflow tracking store {uri} failed while re-opening run {self.run_id}: "
                            f"{exc.message}") from None
        return self

    @staticmethod
    def mark_killed(info: dict[str, Any], cfg: TrackingConfig) -> bool:
        """A run whose process died and that will not be continued: RUNNING -> KILLED (in the store
        it lives in, when that is this one). True when it was marked."""
        uri = resolve_uri(cfg)
        if not cfg.enabled or not info.get("run_id") or info.get("tracking_uri") != uri:
            return False
        client = MlflowClient(tracking_uri=uri)
        try:
            if client.get_run(info["run_id"]).info.status != "RUNNING":
                return False
            client.set_terminated(info["run_id"], "KILLED")
        except MlflowException:
            return False  # deleted, or the store is elsewhere now: nothing to mend
        return True

    @contextmanager
    def failing_as(self, doing: str, after: str) -> Iterator[None]:
        """Inside: an MLflow call that fails past MLflow's own retries (the server gone, a 5xx,
        a refusal) ends the stage with one line -- the server, what the stage was ``doing``, the
        error, and ``after`` (what is already safe and what to run) -- instead of a traceback. For
        the short stages that call MLflow directly (evaluate, register); training's calls go
        through the outbox (``buffer``) instead."""
        import requests

        try:
            yield
        except (MlflowException, requests.RequestException) as exc:
            text = exc.message if isinstance(exc, MlflowException) else str(exc)
            cause = re.search(r"Caused by (\w+)", text)  # urllib3's retries exhausted: the connection's error
            why = f"no answer: {cause.group(1)}" if cause else f"{type(exc).__name__}: {text[:300]}"
            raise TrackingUnavailable(f"the MLflow server {self.uri} failed while {doing} ({why}); {after}") from None

    def buffer(self, retry_seconds: float) -> None:
        """From now on every call goes through an :class:`Outbox` (see the module docstring)."""
        if self.active and self.outbox is None:
            self.outbox = Outbox(retry_seconds)

    def _call(self, what: str, call: Callable[[], Any]) -> None:
        if self.outbox is not None:
            self.outbox.put(what, call)
        else:
            call()

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
        """Many (key, value, step) in as few calls as MLflow allows. A re-opened run skips the
        steps MLflow already holds."""
        if not self.active:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(s)) for k, v, s in rows if int(s) > self.logged.get(k, -1)]
        for i in range(0, len(metrics), MAX_BATCH):
            batch = metrics[i:i + MAX_BATCH]
            self._call(f"metrics:{len(batch)}", lambda batch=batch: self.client.log_batch(self.run_id, metrics=batch))

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self.log_metric_rows((k, v, step or 0) for k, v in values.items())

    def log_image(self, image, key: str, step: int) -> None:
        """An image series (the MLflow UI shows it with a step slider). The run tag
        ``aigc.logged.image.<key>`` follows the last step delivered (what ``reopen`` reads back)."""
        if not self.active or step <= self.logged.get(f"image.{key}", -1):
            return
        image = image.copy()  # the outbox may send it later
        self._call(f"image:{key}", lambda: self.client.log_image(self.run_id, image, key=key, step=step))
        self._call("tags:1", lambda: self.client.set_tag(self.run_id, f"aigc.logged.image.{key}", str(step)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (buffered: a copy taken now, so a later rewrite of ``path`` does not matter)."""
        if not self.active:
            return
        if self.outbox is None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
            return
        import shutil
        import tempfile

        keep = Path(tempfile.mkdtemp(prefix="aigc-outbox-")) / Path(path).name
        self._copies.append(keep.parent)
        shutil.copy2(path, keep)

        def upload() -> None:
            self.client.log_artifact(self.run_id, str(keep), artifact_path)

        self._call(f"artifact:{Path(path).name}", upload)

    def log_table(self, columns: dict[str, list[Any]], artifact_file: str) -> None:
        """A table artifact (column name -> values): MLflow's UI shows it as a table, and its
        evaluation view compares it across runs."""
        if self.active:
            self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            batch = [RunTag(k, str(v)) for k, v in tags.items()]
            self._call(f"tags:{len(batch)}", lambda: self.client.log_batch(self.run_id, tags=batch))

    def end(self, ok: bool) -> str | None:
        """FINISHED (or FAILED). A buffered run first waits for its outbox; returns, instead of
        raising, a one-line account of what did not reach the server (None when all did)."""
        if not self.active:
            return None
        status = "FINISHED" if ok else "FAILED"
        self._call("status:1", lambda: self.client.set_terminated(self.run_id, status))
        if self.outbox is None:
            return None
        pending, box = self.outbox.close(), self.outbox
        self.outbox = None
        import shutil

        for folder in self._copies:  # what did not arrive is re-sent by a rerun of the stage, from its outputs
            shutil.rmtree(folder, ignore_errors=True)
        problems = []
        if pending:
            down = time.monotonic() - box.down_since if box.down_since is not None else 0.0
            problems.append(f"the MLflow server {self.uri} has not answered for {down:.0f} s ({box.last_error}; "
                            f"tracking.retry_seconds = {box.retry_seconds:g}): {describe_pending(pending)} of run "
                            f"{self.run_id} did not reach it")
        if box.refused:
            problems.append(f"the MLflow server refused {len(box.refused)} call(s), first: {box.refused[0]}")
        return "; ".join(problems) or None

    def log_pyfunc_model(self, name: str, code_path: str | Path, artifacts: dict[str, str], signature: Any,
                         input_example: Any, pip_requirements: list[str]) -> str:
        """Log an ``mlflow.pyfunc`` model into this run as *models from code*: ``code_path`` is a
        Python file that defines the model and calls ``mlflow.models.set_model(...)``; MLflow
        stores a copy of it beside the artifact files. Returns its ``models:/m-...`` URI, which
        :meth:`Registry.register` takes.

        A model object is refused: MLflow would cloudpickle it, and unpickling can execute
        arbitrary code in whoever loads the registered model. ``pip_requirements`` must be given:
        inferring them costs ~11 s (stack.md).
        """
        if not isinstance(code_path, (str, Path)) or not Path(code_path).is_file():
            raise TypeError(f"log_pyfunc_model takes the path of the model's code file (models from code), "
                            f"not {type(code_path).__name__}: a pickled object runs code when loaded")
        if not self.active:
            raise RuntimeError("log_pyfunc_model needs an active run (tracking.enabled)")
        import tempfile

        import mlflow.pyfunc
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        # What mlflow.pyfunc.log_model does, through this run's own client instead of the
        # module-level (fluent) API and its global tracking URI.
        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id,
                                                tags={"mlflow.modelFlavor": "python_function"})
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)])
        with tempfile.TemporaryDirectory(prefix="aigc-model-") as tmp:
            local = Path(tmp) / "model"
            meta = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=self.run_id,
                         model_id=model.model_id)
            mlflow.pyfunc.save_model(path=str(local), python_model=str(code_path), artifacts=artifacts,
                                     signature=signature, input_example=input_example,
                                     pip_requirements=pip_requirements, mlflow_model=meta)
            self.client.log_model_artifacts(model.model_id, str(local))
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        return f"models:/{model.model_id}"

    def info(self) -> dict[str, Any]:
        """What later stages need to find this run again (written to the run file)."""
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.uri}


# --- The model registry: versions, their tags and aliases (never the deprecated stages) ---------


@dataclass(frozen=True)
class ModelVersion:
    """One registered version, as the rest of aigc sees it (no MLflow types outside this module)."""

    name: str
    version: str
    tags: dict[str, str]
    aliases: list[str]
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _version(mv: Any) -> ModelVersion:
    return ModelVersion(mv.name, str(mv.version), dict(mv.tags or {}), list(mv.aliases or []), mv.run_id)


class Registry:
    """The MLflow model registry of one tracking store (the registry lives beside the runs)."""

    def __init__(self, uri: str):
        _check_reachable(uri)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    @classmethod
    def open(cls, cfg: TrackingConfig) -> "Registry":
        """The registry of ``MLFLOW_TRACKING_URI``, else ``tracking.uri`` (as the pipeline does)."""
        return cls(resolve_uri(cfg))

    def _model(self, name: str) -> Any | None:
        try:
            return self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def by_alias(self, name: str, alias: str) -> ModelVersion | None:
        """The version ``alias`` points at; None when the model or the alias does not exist yet."""
        model = self._model(name)
        if model is None or alias not in (model.aliases or {}):
            return None
        return _version(self.client.get_model_version(name, model.aliases[alias]))

    def find(self, name: str, tag: str, value: str) -> ModelVersion | None:
        """The newest version of ``name`` whose tag ``tag`` is ``value`` (e.g. the same generator file)."""
        if self._model(name) is None:
            return None
        found = [mv for mv in self.client.search_model_versions(f"name = '{name}'") if (mv.tags or {}).get(tag) == value]
        return _version(max(found, key=lambda mv: int(mv.version))) if found else None

    def register(self, model_uri: str, name: str, tags: dict[str, str]) -> ModelVersion:
        """A new version of ``name`` (created if needed) from a logged model's URI, with ``tags``."""
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        source, run_id, model_id = model_uri, None, None
        if model_uri.startswith("models:/m-"):
            # Resolve the logged model here, through this client: given a models:/ source (or no
            # run id), MLflow 3.17's SQL registry store looks the model up through a new
            # MlflowClient() -- the process-wide URI, i.e. possibly another store.
            logged = self.client.get_logged_model(model_uri.removeprefix("models:/"))
            source, run_id, model_id = logged.artifact_location, logged.source_run_id, logged.model_id
        mv = self.client.create_model_version(name, source=source, run_id=run_id,
                                              tags={k: str(v) for k, v in tags.items()}, model_id=model_id)
        return _version(self.client.get_model_version(name, mv.version))

    def set_tags(self, version: ModelVersion, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(version.name, version.version, key, str(value))

    def set_alias(self, version: ModelVersion, alias: str) -> None:
        """Point ``alias`` at ``version`` (moving it from wherever it was), unconditionally."""
        self.client.set_registered_model_alias(version.name, alias, version.version)

    def compare_and_set_alias(self, version: ModelVersion, alias: str, expected: str | None,
                              timeout_s: float = LOCK_TIMEOUT_S, stale_s: float = LOCK_STALE_S
                              ) -> tuple[bool, ModelVersion | None]:
        """Point ``alias`` at ``version`` only if it still points at version ``expected`` (None: the
        alias does not exist yet). Returns (moved, the version the alias points at afterwards).

        MLflow's alias update is last-writer-wins, so the read and the write happen under the
        registry's alias lock (:meth:`lock`): two register stages that both decided against the
        same champion cannot both move the alias; the second finds it moved and must decide again.
        """
        with self.lock(f"{version.name}{LOCK_SUFFIX}", timeout_s, stale_s):
            now = self.by_alias(version.name, alias)
            if (now.version if now else None) != expected:
                return False, now
            self.set_alias(version, alias)
        return True, version

    @contextmanager
    def lock(self, name: str, timeout_s: float = LOCK_TIMEOUT_S, stale_s: float = LOCK_STALE_S) -> Iterator[None]:
        """A mutex every client of this tracking store shares, whatever the backend (SQLite file,
        PostgreSQL behind a server): the registered model ``name`` itself. Creating a registered
        model is atomic in MLflow's stores (a unique name; a second create fails with
        RESOURCE_ALREADY_EXISTS), so whoever creates it holds the lock, and deleting it releases it.

        A lock left by a holder that died is broken once it has stayed the same lock (its token)
        for ``stale_s`` seconds of this process's clock (no clock shared with other machines is
        assumed); the sections it guards take milliseconds. Waiting longer than ``timeout_s``
        stops with a clear error.
        """
        token = uuid.uuid4().hex
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        deadline = time.monotonic() + timeout_s
        seen: tuple[str, float] | None = None  # (the held lock's token, when this process first saw it)
        while True:
            try:
                self.client.create_registered_model(
                    name, tags={LOCK_TOKEN_TAG: token, "aigc.lock.holder": holder},
                    description="aigc's registry lock, held for milliseconds while an alias moves; "
                                "delete it only if its holder is dead")
                break
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise
            held = self._model(name)
            if held is not None:
                other = (held.tags or {}).get(LOCK_TOKEN_TAG, "?")
                if seen is None or seen[0] != other:
                    seen = (other, time.monotonic())
                elif time.monotonic() - seen[1] > stale_s:
                    self._release(name, other)  # its holder died inside the section: break it
                    seen = None
                    continue
                if time.monotonic() > deadline:
                    who = (held.tags or {}).get("aigc.lock.holder", "unknown")
                    raise UserError(f"the registry lock {name!r} in {self.uri} has been held for more than "
                                    f"{timeout_s:g} s (by {who}); if that process is gone and the lock is not "
                                    f"broken automatically (deleting it needs MANAGE permission on a server "
                                    f"with authentication), delete the registered model {name!r} by hand")
            time.sleep(random.uniform(0.05, 0.25))  # jitter: waiters do not retry in lockstep
        try:
            yield
        finally:
            self._release(name, token)

    def _release(self, name: str, token: str) -> None:
        """Delete the lock ``name`` if it is still the one with ``token`` (never a newer holder's)."""
        held = self._model(name)
        if held is None or (held.tags or {}).get(LOCK_TOKEN_TAG) != token:
            return
        try:
            self.client.delete_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise

    def resolve(self, uri: str) -> ModelVersion:
        """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> the version; a clear error for an
        unknown model, alias or version."""
        m = re.fullmatch(r"models:/([^@/]+)(?:@([^/]+)|/(\d+))", uri)
        if not m:
            raise UserError(f"{uri!r} is not a registered-model URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
        name, alias, number = m.groups()
        model = self._model(name)
        if model is None:
            known = sorted(r.name for r in self.client.search_registered_models() if not r.name.endswith(LOCK_SUFFIX))
            raise UserError(f"no registered model {name!r} in {self.uri}; registered: "
                            f"{', '.join(known) if known else 'none yet (dvc repro registers one)'}")
        aliases = dict(model.aliases or {})
        if alias is not None:
            if alias not in aliases:
                have = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
                raise UserError(f"model {name!r} has no alias {alias!r} in {self.uri}; its aliases: {have}")
            number = aliases[alias]
        try:
            return _version(self.client.get_model_version(name, number))
        except MlflowException:
            versions = sorted(int(mv.version) for mv in self.client.search_model_versions(f"name = '{name}'"))
            raise UserError(f"model {name!r} has no version {number} in {self.uri}; versions: "
                            f"{', '.join(map(str, versions)) or 'none'}") from None

    def download(self, version: ModelVersion, dst: str | Path) -> dict[str, Path]:
        """Download a version's pyfunc model into ``dst``; returns its artifact files by name
        (``{"generator": .../generator.pt, "evaluator": ...}``)."""
        import mlflow.artifacts
        from mlflow.models import Model

        source = self.client.get_model_version_download_uri(version.name, version.version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=self.uri,
                                                         registry_uri=self.uri))
        flavor = Model.load(str(local)).flavors.get("python_function", {})
        return {key: local / spec["path"] for key, spec in (flavor.get("artifacts") or {}).items()}


# --- Reading a finished run back (aigc report, aigc doctor) ------------------------------------------


def check_store(uri: str) -> str:
    """Whether the tracking store at ``uri`` answers: a few words on what it holds, or a UserError
    with what to do. A SQLite file that does not exist yet is fine (the first run creates it) and is
    not created here."""
    _check_reachable(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return "no store file yet (the first run creates it)"
    try:
        experiments = MlflowClient(tracking_uri=uri).search_experiments(max_results=1000)
    except MlflowException as exc:
        raise UserError(f"MLflow tracking store {uri} does not answer: {exc.message}") from None
    return f"{len(experiments)} experiment(s)"


@dataclass(frozen=True)
class RunRecord:
    """What MLflow holds about one run, as plain data (no MLflow types outside this module)."""

    run_id: str
    run_name: str
    experiment: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    artifacts: Path  # the run's downloaded artifact folders (reports/, evaluation/, report/, ...)


def fetch_run(uri: str, run_id: str, dst: str | Path, folders: Iterable[str]) -> RunRecord:
    """Run ``run_id`` of the store at ``uri``: its params, tags and latest metrics, and the artifact
    ``folders`` it has, downloaded under ``dst``. A UserError names a run id the store does not know."""
    _check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise UserError(f"no MLflow run {run_id!r} in {uri} ({exc.error_code}); list the runs with "
                        f"`make ui` or pass another id") from None
    dst = Path(dst)
    have = {a.path for a in client.list_artifacts(run_id)}
    for folder in folders:
        if folder in have:
            client.download_artifacts(run_id, folder, str(dst))
    exp = client.get_experiment(run.info.experiment_id)
    return RunRecord(run_id=run.info.run_id, run_name=run.info.run_name or "", experiment=exp.name,
                     status=run.info.status, params=dict(run.data.params), tags=dict(run.data.tags),
                     metrics=dict(run.data.metrics), artifacts=dst)
