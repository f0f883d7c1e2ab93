"""One MLflow run (``Run``), and a finished run read back as plain data (``fetch_run``).

A training's run can be *buffered* (``Run.buffer``): its calls then go, in order, through a
background outbox (``aigc/tracking/outbox.py``) that retries each with exponential backoff while
the server does not answer, so a tracking server that restarts mid-run costs the curves nothing
and training never waits on it. ``end`` waits at most ``tracking.retry_seconds`` of outage for the
outbox to drain and says what did not arrive. A run is re-opened after a kill (``Run.reopen``):
what MLflow already holds is read back (each metric's last step, each image series' last step,
kept as the run tag ``aigc.logged.image.<key>``), so the resumed stage sends every missing value
once and nothing twice.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from aigc.config import TrackingConfig
from aigc.errors import UserError
from aigc.tracking.outbox import Outbox, describe_pending
from aigc.tracking.store import EXPERIMENT_KIND, _check_reachable, _create_experiment, project_uri, resolve_uri

MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
MAX_PARAM_LEN = 6000


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
        inferring them costs ~11 s (docs/development.md, "The stack").
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



# --- Reading a finished run back (aigc report, aigc doctor) ------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """What MLflow holds about one run, as plain data (no MLflow types outside aigc.tracking)."""

    run_id: str
    run_name: str
    experiment: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    artifacts: Path  # the run's downloaded artifact folders (reports/, evaluation/, report/, ...)


def fetch_run(uri: str, run_id: str, dst: str | Path, folders: Iterable[str]) -> RunRecord:
    """Run ``run_id`` (or the one run whose id starts with it) of the store at ``uri``: its params,
    tags and latest metrics, and the artifact ``folders`` it has, downloaded under ``dst``. A
    UserError names a run id the store does not know, or a start several ids share."""
    _check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    run_id = _full_run_id(client, uri, run_id)
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


RUN_ID = re.compile(r"[0-9a-f]{32}")


def _full_run_id(client: MlflowClient, uri: str, run_id: str) -> str:
    """``run_id`` itself when it is a whole MLflow run id, else the one run id of the store that
    starts with it (the 8 characters of ``run-<id>.html``, or what a screen shows): a UserError
    when none does, or when several do."""
    if RUN_ID.fullmatch(run_id):
        return run_id
    if not re.fullmatch(r"[0-9a-f]{1,31}", run_id):
        raise UserError(f"{run_id!r} is not an MLflow run id (32 characters 0-9a-f) or the start of one; copy it "
                        f"from the MLflow UI (`make ui`) or the run file")
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    matches: list[str] = []
    token = None
    while experiments:
        page = client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        matches += [r.info.run_id for r in page if r.info.run_id.startswith(run_id)]
        token = page.token
        if not token:
            break
    if not matches:
        raise UserError(f"no MLflow run {run_id!r} in {uri} (no run id starts with it); list the runs with "
                        f"`make ui` or pass another id")
    if len(matches) > 1:
        shown = ", ".join(sorted(matches)[:3]) + (", ..." if len(matches) > 3 else "")
        raise UserError(f"{len(matches)} MLflow runs in {uri} have an id that starts with {run_id!r} ({shown}); "
                        f"give more of the id")
    return matches[0]
