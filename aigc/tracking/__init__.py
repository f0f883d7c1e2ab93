"""The one place that talks to MLflow.

Library code reports through plain hooks (``aigc.training.StepWindow``, grids as arrays);
this package turns them into MLflow calls. One training = one MLflow run (``run.py``). The model
registry (``model_registry.py``: versions, their tags, the ``champion`` alias) lives here too;
the decision of what to promote is plain logic in ``aigc/promotion.py``.

- ``store.py``: which tracking store (URI) a process uses, whether it answers and lets us in,
  the experiment, and the workspace facts a run records (``git_commit``).
- ``outbox.py``: the background queue that retries MLflow calls while the server is away.
- ``run.py``: one run (``Run``), and a finished run read back as plain data (``fetch_run``).
- ``model_registry.py``: the registry (``Registry``, ``ModelVersion``) and its alias lock.

The store is ``tracking.uri`` from params.yaml (a local SQLite file by default) unless
``MLFLOW_TRACKING_URI`` is set, which wins, as MLflow users expect. That choice is made once
(``resolve_uri``) and then travels as an explicit ``MlflowClient``/URI: nothing here sets MLflow's
module-level tracking URI or writes ``os.environ``, so two stores in one process (a shared server
and a local file, an earlier run's store) never get mixed up.

Every name other modules use is importable from here (``from aigc.tracking import Run``).
"""

from __future__ import annotations

from aigc import environment

environment.apply()  # offline and quiet before MLflow loads (aigc/environment.py, the one place)

from aigc.config import TrackingConfig  # noqa: E402  (re-exported: callers type their configs with it)
from aigc.tracking.model_registry import (  # noqa: E402
    LOCK_STALE_S,
    LOCK_SUFFIX,
    LOCK_TIMEOUT_S,
    LOCK_TOKEN_TAG,
    ModelVersion,
    Registry,
)
from aigc.tracking.outbox import Outbox, describe_pending  # noqa: E402
from aigc.tracking.run import MAX_BATCH, MAX_PARAM_LEN, Run, RunRecord, TrackingUnavailable, fetch_run  # noqa: E402
from aigc.tracking.store import (  # noqa: E402
    EXPERIMENT_KIND,
    artifact_location,
    check_store,
    git_commit,
    project_uri,
    resolve_uri,
    workspace_root,
)

__all__ = [
    "EXPERIMENT_KIND", "LOCK_STALE_S", "LOCK_SUFFIX", "LOCK_TIMEOUT_S", "LOCK_TOKEN_TAG", "MAX_BATCH",
    "MAX_PARAM_LEN", "ModelVersion", "Outbox", "Registry", "Run", "RunRecord", "TrackingConfig",
    "TrackingUnavailable", "artifact_location", "check_store", "describe_pending", "fetch_run", "git_commit",
    "project_uri", "resolve_uri", "workspace_root",
]
