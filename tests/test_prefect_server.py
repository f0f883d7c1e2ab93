"""One Prefect server shared by the stage processes of a command, stopped when it ends."""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_module

pytestmark = pytest.mark.slow


def server_port(stderr: str) -> int:
    match = re.search(r"Prefect server for this run at http://127\.0\.0\.1:(\d+)/api", stderr)
    assert match, stderr
    return int(match.group(1))


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# Run as the command under the wrapper: is the server up yet, then a stage as DVC runs it, then
# what the Prefect UI shows of it (its flow run, final state and printed lines), as JSON.
COMMAND = """
import json, os, subprocess, sys
from aigc.services.prefect_server import _healthy
up_when_the_command_started = _healthy(os.environ["PREFECT_API_URL"])
stage = subprocess.run([sys.executable, "-m", "pipeline.ingest", *sys.argv[1:]], capture_output=True, text=True)
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs()
    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
print(json.dumps({"up_at_start": up_when_the_command_started, "stage_rc": stage.returncode,
                  "stage_err": stage.stdout + stage.stderr, "runs": [(r.name, r.state_name) for r in runs],
                  "flows": sorted({str(r.flow_id) for r in runs}), "logs": [log.message for log in logs]}))
"""


def test_stage_flows_use_the_shared_server_which_starts_beside_the_command_then_stops(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("data:\n  source: digits\n")
    # its own PREFECT_HOME: the server's database then holds this test's flow run only, not the
    # runs of earlier commands in the checkout's .prefect/
    res = run_module(["-m", "aigc.services.prefect_server", sys.executable, "-c", COMMAND,
                      "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "raw")], cwd=ROOT,
                     env={"PREFECT_HOME": str(tmp_path / ".prefect")})
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen["stage_rc"] == 0, seen["stage_err"]
    # the command did not wait for the server's ~6 s start-up; the stage waited when its flow began
    assert seen["up_at_start"] is False
    assert "Starting temporary server" not in seen["stage_err"]  # no ephemeral server per stage
    assert (tmp_path / "raw" / "images.npy").exists()
    # the stage is a flow run on the server, with its final state and its printed lines
    assert [state for _, state in seen["runs"]] == ["Completed"] and len(seen["flows"]) == 1
    assert any(m.startswith("ingested 1797 images of 8x8x1 from digits") for m in seen["logs"]), seen["logs"]
    assert "Prefect server for this run up after" in res.stderr
    assert not listening(server_port(res.stderr))


def test_the_command_exit_code_passes_through():
    res = run_module(["-m", "aigc.services.prefect_server", sys.executable, "-c", "import sys; sys.exit(3)"], cwd=ROOT)
    assert res.returncode == 3
    assert not listening(server_port(res.stderr))


def test_a_server_that_cannot_start_is_one_error_line(tmp_path: Path):
    # an unusable database URL makes `prefect server start` exit at once; the stage, started
    # beside it, fails when its flow would begin, before it writes anything
    (tmp_path / "params.yaml").write_text("data:\n  source: digits\n")
    res = run_module(["-m", "aigc.services.prefect_server", sys.executable, "-m", "pipeline.ingest",
                      "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "raw")], cwd=ROOT,
                     env={"PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_DATABASE_CONNECTION_URL": "nosuchdb://x"})
    assert res.returncode == 1
    assert not (tmp_path / "raw").exists()
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in res.stderr.split("error:")[0], res.stderr
    assert errors[0].startswith("error: the Prefect server for this run (http://127.0.0.1:")
    assert errors[0].endswith(f") exited; its log: {tmp_path / 'server.log'}")
    assert f"the Prefect server did not start (see {tmp_path / 'server.log'}):" in res.stderr  # and its log's tail


def test_a_command_that_succeeds_without_the_server_still_reports_its_failure(tmp_path: Path):
    wait_for_the_server_to_exit = ("import os, time; from aigc.services.prefect_server import SERVER_PID, _pid_alive\n"
                                   "while _pid_alive(int(os.environ[SERVER_PID])): time.sleep(0.1)")
    res = run_module(["-m", "aigc.services.prefect_server", sys.executable, "-c", wait_for_the_server_to_exit],
                     cwd=ROOT, env={"PREFECT_HOME": str(tmp_path),
                                    "PREFECT_SERVER_DATABASE_CONNECTION_URL": "nosuchdb://x"})
    assert res.returncode == 1
    assert "error: the Prefect server did not start (see " in res.stderr
