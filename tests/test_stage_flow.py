"""How a stage runs its flow under ``python -m aigc.services.prefect_server`` (issue 15, item 4): it waits
for the run's server, which starts beside the command, and runs without heartbeats there only."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from aigc.errors import UserError
from aigc.services.prefect_server import SERVER_PID, await_server, flow_settings
from tests.conftest import ROOT


def test_heartbeats_are_off_on_the_runs_own_server_only():
    from prefect.settings import get_current_settings, temporary_settings

    own = {"PREFECT_API_URL": "http://127.0.0.1:9/api", SERVER_PID: "12345"}
    with temporary_settings(flow_settings(own)):
        assert get_current_settings().flows.heartbeat_frequency is None
    # a server the user runs (make services, Prefect Cloud) may have a zombie-run automation
    with temporary_settings(flow_settings({"PREFECT_API_URL": "http://127.0.0.1:4200/api"})):
        assert get_current_settings().flows.heartbeat_frequency == 180


def test_a_stage_does_not_wait_for_a_server_the_user_runs():
    # A real listening socket stands for the user's server: it accepts connections but never
    # answers. Without the run's server pid the stage must not probe it (not one connection),
    # so it neither waits for it nor fails on it.
    with socket.socket() as user_server:
        user_server.bind(("127.0.0.1", 0))
        user_server.listen(8)
        user_server.setblocking(False)
        url = f"http://127.0.0.1:{user_server.getsockname()[1]}/api"
        assert await_server({"PREFECT_API_URL": url}) is None
        assert await_server({"PREFECT_API_URL": url, SERVER_PID: ""}) is None
        assert await_server({}) is None
        with pytest.raises(BlockingIOError):  # nothing connected: the stage never asked it for /health
            user_server.accept()


def test_a_stage_fails_with_one_line_when_the_runs_server_has_exited(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    env = {"PREFECT_API_URL": "http://127.0.0.1:9/api", SERVER_PID: str(gone.pid), "PREFECT_HOME": str(tmp_path)}
    with pytest.raises(UserError, match=r"the Prefect server for this run \(http://127\.0\.0\.1:9/api\) exited; "
                                        r"its log: .*server\.log"):
        await_server(env)


def test_a_stage_process_freezes_its_heap_before_it_exits(tmp_path):
    # The stage without its flow (aigc_bench.orchestration's harness, no server needed); at exit
    # the heap must be frozen, so the interpreter's final collections skip it (~0.8 s per process).
    from aigc_bench.orchestration import PLAIN

    (tmp_path / "params.yaml").write_text("data:\n  source: digits\n")
    probe = "import atexit, gc; atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
    res = subprocess.run([sys.executable, "-c", probe + PLAIN, "pipeline.ingest", "--params", str(tmp_path / "params.yaml"),
                          "--out", str(tmp_path / "raw")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "raw" / "images.npy").exists()
    frozen = int(res.stdout.strip().splitlines()[-1].removeprefix("frozen "))
    assert frozen > 10_000  # the modules' objects (numpy, pydantic, aigc), not a handful
