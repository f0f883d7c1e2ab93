"""The offline and quiet environment: the one place that sets it (docs/development.md, "The stack").

MLflow, Prefect, DVC and great-expectations read these variables when they load, so they are
set before any of them is imported: ``pipeline/__init__.py``, ``aigc/tracking`` and
``aigc/quality`` call :func:`apply` first thing; the test suite too. A value the user already
exported wins. Tools started from the Makefile get it through ``python -m aigc.environment CMD``,
which runs CMD with this environment added.

Only telemetry, start-up budgets, retry limits and the refusal of pickled models live here -- never where a run goes: the
tracking store and the Prefect API are passed explicitly (a client, a URI), not through globals.

One Prefect setting cannot live here: flow-run heartbeats are turned off only by a null, which
Prefect's settings do not read from the environment; ``aigc/services/prefect_server.py``
(``flow_settings``) turns them off for the stages of a ``make run``, whose own server has no
services to receive them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path


def quiet(cwd: Path | None = None) -> dict[str, str]:
    """The variables and their values (``PREFECT_HOME`` is ``<cwd>/.prefect``)."""
    return {
        "DO_NOT_TRACK": "true",  # must be 'true', not 1
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # else `mlflow server` starts 7 workers (~1.9 GB)
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no bar per model download
        # A dead tracking server should fail in seconds, not after MLflow's default minutes of retries.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
        # Loading a registered model never unpickles code: aigc logs models from code
        # (pipeline/serving.py); a cloudpickled pyfunc (anyone's) is refused, not executed.
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        "PREFECT_HOME": str((cwd or Path.cwd()) / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The ephemeral server's default 20 s start-up budget is too tight on a busy 2-core machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "False",
        "NO_MKDOCS_2_WARNING": "1",  # Material's end-of-life banner on every `make docs`
    }


def apply(environ: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Add the quiet variables to ``environ`` (default: this process's), keeping values already set."""
    env = os.environ if environ is None else environ
    for key, value in quiet().items():
        env.setdefault(key, value)
    return env


def main(argv: list[str]) -> int:
    """``python -m aigc.environment CMD ARGS...``: run CMD in the quiet environment."""
    if not argv:
        print("usage: python -m aigc.environment CMD [ARGS...]", file=sys.stderr)
        return 2
    apply()
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        print(f"error: command {argv[0]!r} not found; activate the venv (make install)", file=sys.stderr)
        return 127
    return 0  # not reached: exec replaced the process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
