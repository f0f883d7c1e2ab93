"""The stages, each a Prefect flow that DVC runs as ``python -m pipeline.<stage> ...paths``.

Importing this package sets the offline/quiet environment (stack.md) before Prefect or MLflow
load, so a user never has to export anything; a value the user did set wins.
"""

import os
from pathlib import Path

_QUIET = {
    "DO_NOT_TRACK": "true",  # must be 'true', not 1
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PREFECT_HOME": str(Path.cwd() / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The ephemeral server's default 20 s start-up budget is too tight on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "False",
}
for _k, _v in _QUIET.items():
    os.environ.setdefault(_k, _v)
