"""One Prefect server shared by the stage processes of a command, stopped when it ends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_module

pytestmark = pytest.mark.slow


def prefect_servers() -> list[str]:
    res = subprocess.run(["pgrep", "-f", f"{Path(sys.executable).parent}/prefect server start"],
                         capture_output=True, text=True)
    return res.stdout.split()


def test_stage_flows_use_the_shared_server(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("data:\n  source: digits\n")
    res = run_module(["-m", "pipeline.prefect_server", sys.executable, "-m", "pipeline.ingest",
                      "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "raw")], cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "Prefect server for this run at http://127.0.0.1:" in res.stderr
    assert "Starting temporary server" not in res.stderr + res.stdout  # no ephemeral server per stage
    assert (tmp_path / "raw" / "images.npy").exists()
    assert not prefect_servers()


def test_the_command_exit_code_passes_through_and_the_server_stops():
    res = run_module(["-m", "pipeline.prefect_server", sys.executable, "-c", "import sys; sys.exit(3)"], cwd=ROOT)
    assert res.returncode == 3
    assert not prefect_servers()
