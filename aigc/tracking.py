"""The one place that talks to MLflow.

Library code reports through plain hooks (``aigc.training.StepWindow``, grids as arrays);
this module turns them into MLflow calls. One training = one MLflow run. The model registry
(``Registry``: versions, their tags, the ``champion`` alias) lives here too; the decision of
what to promote is plain logic in ``aigc/registry.py``.

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
import time
import uuid
from collections.abc import Iterable, Iterator
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
        return client.create_experiment(cfg.experiment, artifact_location=artifact_location(cfg, uri))
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
                exp_id = _create_experiment(client, cfg, uri)
            else:
                exp_id = exp.experiment_id
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
