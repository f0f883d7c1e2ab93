"""Run a command with one local Prefect server shared by all the stage flows it starts.

    python -m aigc.services.prefect_server dvc repro
    python -m aigc.services.prefect_server dvc exp run -S train.epochs=2

Without it each stage process (DVC runs one per stage) starts Prefect's ephemeral server,
measured here at ~6-9 s per stage; with one server for the whole command, a stage's flow
costs ~1-2 s and the server ~9 s once (numbers: reports/benchmarks/). ``make run`` uses it.

A ``dvc repro`` with nothing to do starts no server: DVC's own status (its Python API) is asked
first, and when every stage is up to date the command runs without one (~2 s instead of ~11 s).

This is Prefect's own server (``prefect server start``, API only, no UI or background
services), started on a free loopback port and stopped when the command ends. If
``PREFECT_API_URL`` is already set (your own server or Prefect Cloud), the command just runs
against it.

The server and the command start together: the server's ~6 s of start-up overlap DVC's own
start and the first stage's imports. The command gets ``PREFECT_API_URL`` and
``AIGC_PREFECT_SERVER_PID`` (this server, maybe still starting); a stage waits for the server's
health only when its flow is about to start (``await_server``), and fails with one line if the
server exits instead. On this server (no services: no event persister, no triggers) flow-run
heartbeats would be discarded events, so a stage runs its flow without them (``flow_settings``);
against any other server they stay on.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aigc import environment
from aigc.errors import UserError

environment.apply()  # the offline/quiet environment and PREFECT_HOME (aigc/environment.py)

STARTUP_TIMEOUT_S = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


SERVER_PID = "AIGC_PREFECT_SERVER_PID"  # set for the command: the run's own server, maybe still starting


def spawn_server(services: bool = False) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` on a free loopback port without waiting; returns (process, API URL).

    ``services``: also run the server's background services -- the scheduler among them, which a
    cron schedule needs (``python -m pipeline.retrain serve``); a plain ``dvc repro`` does not.
    """
    port = _free_port()
    home = Path(os.environ["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "server.log", "w")
    prefect = str(Path(sys.executable).with_name("prefect"))
    proc = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui",
         *([] if services else ["--no-services"]), "--analytics-off", "--log-level", "WARNING"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()  # the child has its own descriptor
    return proc, f"http://127.0.0.1:{port}/api"


def _wait_healthy(url: str, alive, timeout_s: float) -> bool:
    """Poll ``url``/health until it answers (True), or the server is gone or the time is up (False)."""
    deadline = time.monotonic() + timeout_s
    while not _healthy(url):
        if not alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _server_failed() -> str:
    log = Path(os.environ["PREFECT_HOME"]) / "server.log"
    return f"the Prefect server did not start (see {log}):\n{log.read_text(errors='replace')[-1500:]}"


def start_server(services: bool = False) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` and wait until its API answers; returns (process, API URL)."""
    proc, url = spawn_server(services)
    if not _wait_healthy(url, lambda: proc.poll() is None, STARTUP_TIMEOUT_S):
        stop_server(proc)
        raise SystemExit(f"error: {_server_failed()}")
    return proc, url


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def await_server(environ: Mapping[str, str] = os.environ) -> None:
    """In a stage under this wrapper: wait until the run's server answers (it starts beside the
    command). Anywhere else (no ``AIGC_PREFECT_SERVER_PID``) return at once: a server the user
    runs is either up or Prefect's own error says so."""
    pid, url = environ.get(SERVER_PID), environ.get("PREFECT_API_URL")
    if not pid or not url:
        return
    if not _wait_healthy(url, lambda: _pid_alive(int(pid)), STARTUP_TIMEOUT_S):
        log = Path(environ.get("PREFECT_HOME", ".prefect")) / "server.log"
        what = f"did not answer within {STARTUP_TIMEOUT_S:g} s" if _pid_alive(int(pid)) else "exited"
        raise UserError(f"the Prefect server for this run ({url}) {what}; its log: {log}")


def flow_settings(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Prefect settings a stage's flow runs under (``prefect.settings.temporary_settings``).

    On this wrapper's server (no services) heartbeat events have no consumer -- no event
    persister, no zombie-run trigger -- and each costs the stage up to a second at the flow's end
    (Prefect joins its heartbeat thread, which sleeps in 1 s steps): off there. Elsewhere none."""
    if environ.get(SERVER_PID) and environ.get("PREFECT_API_URL"):
        return {"flows.heartbeat_frequency": None}
    return {}


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nothing_to_run(argv: list[str]) -> bool:
    """True when ``argv`` is a plain ``dvc repro [TARGET...]`` and DVC reports every stage up to
    date: no stage process will start, so no server is needed. Anything else (flags, another
    command, a status DVC cannot give) answers False and gets a server as usual."""
    if argv[:2] != ["dvc", "repro"] or any(a.startswith("-") for a in argv[2:]):
        return False
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            return not repo.status(targets=argv[2:] or None)
    except DvcException:
        return False  # let `dvc repro` itself say what is wrong


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if os.environ.get("PREFECT_API_URL"):
        return subprocess.call(argv)
    if nothing_to_run(argv):
        # DVC is loaded already: let it report "up to date" in this process (no second start-up)
        from dvc.cli import main as dvc_main

        return dvc_main(argv[1:])
    t = time.perf_counter()
    proc, url = spawn_server()
    print(f"Prefect server for this run at {url} (starting beside the command)", file=sys.stderr)
    # Health is watched in a thread, for the record: the stages wait for the server themselves
    # (await_server), and when it dies first they fail with one line each; its log tail follows.
    # It also reaps the server if it dies later, so a stage waiting for it sees it gone.
    started: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:
        if _wait_healthy(url, lambda: proc.poll() is None and not done.is_set(), STARTUP_TIMEOUT_S):
            started["s"] = time.perf_counter() - t
            print(f"Prefect server for this run up after {started['s']:.1f} s", file=sys.stderr, flush=True)
        while proc.poll() is None and not done.wait(0.5):
            pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        code = subprocess.call(argv, env=os.environ | {"PREFECT_API_URL": url, SERVER_PID: str(proc.pid)})
    except KeyboardInterrupt:
        return 130
    finally:
        done.set()
        failed = "s" not in started and proc.poll() is not None
        stop_server(proc)
    if failed:
        print(f"{'error: ' if code == 0 else ''}{_server_failed()}", file=sys.stderr)
        return code or 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
