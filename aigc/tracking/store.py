"""The tracking store: which one a process uses, whether it answers and lets us in, the
experiment runs go to, and the workspace facts a run records.

A queued DVC experiment (``dvc exp run --queue``) runs in a temporary copy of the project that
is deleted afterwards; a relative SQLite store is the project's, so it is made absolute against
the project (``workspace_root``, ``project_uri``), or its runs would vanish with the copy.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from aigc.config import TrackingConfig
from aigc.errors import UserError

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


def _verify() -> str | bool:
    """requests' ``verify=``: the CA bundle MLflow's own client verifies the server with
    (``MLFLOW_TRACKING_SERVER_CERT_PATH``, as ``make services`` exports it), else the default CAs."""
    return os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True


def _check_reachable(uri: str) -> None:
    """Fail fast, with advice, when a tracking server or a SQLite folder is not there."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5, verify=_verify()).raise_for_status()
        except requests.exceptions.SSLError as exc:
            ca = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
            trusted = f"the CA bundle {ca} (MLFLOW_TRACKING_SERVER_CERT_PATH)" if ca else "the system's CAs"
            reason = "certificate verify failed" if "CERTIFICATE_VERIFY_FAILED" in str(exc) else "TLS error"
            raise UserError(
                f"MLflow tracking server {uri}: its certificate does not verify against {trusted} ({reason}): "
                f"export MLFLOW_TRACKING_SERVER_CERT_PATH=<the CA bundle that signed it> (make services writes it "
                f"to .services/services.env)"
            ) from None
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
                           headers={"Authorization": f"Bearer {token}"} if token and not user else None, timeout=10,
                           verify=_verify())
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

