"""Run a command with one local Prefect server shared by all the stage flows it starts.

    python -m pipeline.prefect_server dvc repro
    python -m pipeline.prefect_server dvc exp run -S train.epochs=2

Without it each stage process (DVC runs one per stage) starts Prefect's ephemeral server,
measured here at ~6-9 s per stage; with one server for the whole command, a stage's flow
costs ~1-2 s and the server ~9 s once (numbers: reports/benchmarks/). ``make run`` uses it.

A ``dvc repro`` with nothing to do starts no server: DVC's own status (its Python API) is asked
first, and when every stage is up to date the command runs without one (~2 s instead of ~11 s).

This is Prefect's own server (``prefect server start``, API only, no UI or background
services), started on a free loopback port and stopped when the command ends. If
``PREFECT_API_URL`` is already set (your own server or Prefect Cloud), the command just runs
against it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pipeline  # noqa: F401  (the offline/quiet environment, PREFECT_HOME)

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


def start_server(services: bool = False) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` and wait until its API answers; returns (process, API URL).

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
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            tail = (home / "server.log").read_text()[-1500:]
            raise SystemExit(f"error: the Prefect server did not start (see {home / 'server.log'}):\n{tail}")
        time.sleep(0.2)
    return proc, url


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
    proc, url = start_server()
    print(f"Prefect server for this run at {url} (started in {time.perf_counter() - t:.1f} s)", file=sys.stderr)
    try:
        return subprocess.call(argv, env=os.environ | {"PREFECT_API_URL": url})
    except KeyboardInterrupt:
        return 130
    finally:
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
