"""One Prefect server shared by the stage processes of a command, stopped when it ends."""

from __future__ import annotations

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


def test_stage_flows_use_the_shared_server_which_then_stops(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("data:\n  source: digits\n")
    res = run_module(["-m", "pipeline.prefect_server", sys.executable, "-m", "pipeline.ingest",
                      "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "raw")], cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "Starting temporary server" not in res.stderr + res.stdout  # no ephemeral server per stage
    assert (tmp_path / "raw" / "images.npy").exists()
    assert not listening(server_port(res.stderr))


def test_the_command_exit_code_passes_through():
    res = run_module(["-m", "pipeline.prefect_server", sys.executable, "-c", "import sys; sys.exit(3)"], cwd=ROOT)
    assert res.returncode == 3
    assert not listening(server_port(res.stderr))


def test_a_server_that_cannot_start_is_one_error_line(tmp_path: Path):
    # an unusable database URL makes `prefect server start` exit at once
    res = run_module(["-m", "pipeline.prefect_server", sys.executable, "-c", "print('never')"], cwd=ROOT,
                     env={"PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_DATABASE_CONNECTION_URL": "nosuchdb://x"})
    assert res.returncode != 0
    assert "never" not in res.stdout
    assert "error: the Prefect server did not start (see " in res.stderr and "Traceback" not in res.stderr.split("error:")[0]
