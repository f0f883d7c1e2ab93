"""aigc.environment: the one place that sets the offline/quiet variables."""

from __future__ import annotations

import subprocess
import sys

from aigc import environment


def test_apply_fills_what_is_missing_and_keeps_what_the_user_set():
    env = environment.apply({"DO_NOT_TRACK": "yes-mine", "PATH": "/bin"})
    assert env["DO_NOT_TRACK"] == "yes-mine" and env["PATH"] == "/bin"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["DVC_NO_ANALYTICS"] == "1"
    assert env["PREFECT_HOME"].endswith(".prefect")


def test_run_a_tool_in_it_and_a_missing_tool_is_one_line():
    res = subprocess.run([sys.executable, "-m", "aigc.environment", sys.executable, "-c",
                          "import os; print(os.environ['GX_ANALYTICS_ENABLED'])"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "False"
    res = subprocess.run([sys.executable, "-m", "aigc.environment", "no-such-tool-here"], capture_output=True, text=True)
    assert res.returncode == 127 and res.stderr == "error: command 'no-such-tool-here' not found; activate the venv (make install)\n"
