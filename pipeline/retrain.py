"""retrain: the scheduled retraining -- ``dvc repro`` (only what changed runs), then the registry's decision.

    python -m pipeline.retrain run                          # once, now
    python -m pipeline.retrain serve --cron "0 3 * * 1"     # every Monday 03:00 until stopped (Ctrl-C)
    prefect deploy --all && prefect worker start --pool aigc-process   # the same on a Prefect server (prefect.yaml)

New source data changes a DVC dependency, so the next run retrains, evaluates and lets the
register stage decide; with nothing new, ``dvc repro`` skips every stage (about a second).

Two runs never share the workspace: a run takes a file lock (``.dvc/tmp/aigc-retrain.lock``)
around ``dvc repro``. A second run that finds it taken skips with a message (or, with
``wait_s``, waits up to that long first). Prefect's ``serve()`` ignores schedule concurrency
limits, so the lock, not Prefect, is the guard; it also covers a manual run beside a scheduled
one. A ``dvc repro`` started by hand holds DVC's own repo lock: a run that meets it (DVC's
``LockError``) skips too.

The pipeline runs through DVC's Python API (``Repo.reproduce``), in this process: what ran is
the list of stages it returns, a failure is DVC's exception -- no printed English is parsed.
The stage processes get this environment's python first on PATH and this flow run's Prefect
API (``run_env``), without touching this process's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout
from prefect import flow
from prefect.states import Failed

import pipeline  # noqa: F401  (the offline/quiet environment, PREFECT_HOME)

LOCK = Path(".dvc") / "tmp" / "aigc-retrain.lock"  # inside the project; .dvc/tmp is git-ignored by DVC


def registry_record(project: Path) -> Path:
    """The register stage's record (reports/registry.json), as dvc.yaml names it: paths live there only."""
    try:
        outs = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["register"]["outs"]
    except (OSError, KeyError, TypeError) as exc:
        raise FileNotFoundError(f"{project / 'dvc.yaml'} has no register stage with outs ({exc})") from None
    first = outs[0]
    return project / (first if isinstance(first, str) else next(iter(first)))


def _api_url() -> str | None:
    """The Prefect API this flow run reports to, so the stage flows `dvc repro` starts report there
    too (and skip starting an ephemeral server each)."""
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:  # called as retrain.fn(): no Prefect at all
        return os.environ.get("PREFECT_API_URL")
    from prefect.client.orchestration import get_client

    return str(get_client(sync_client=True).api_url)


def reproduce(root: Path, run_env: dict[str, str]) -> list[str]:
    """``dvc repro`` in ``root`` through DVC's Python API; the names of the stages that ran (none:
    everything was up to date). Raises DVC's ``LockError`` when another DVC process holds the
    repo, its ``DvcException`` when a stage fails."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        # the project's dvc.yaml by absolute path: DVC resolves a relative target against the cwd
        ran = repo.reproduce(str(Path(repo.root_dir) / "dvc.yaml"), run_env=run_env)
    return [stage.name for stage in ran]


def _holder(lock: Path) -> str:
    try:
        h = json.loads(lock.with_suffix(".owner.json").read_text())
        return f"pid {h['pid']} on {h['host']}, flow run {h.get('flow_run') or '-'}, since {h['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


@flow(name="retrain", log_prints=True, validate_parameters=False)
def retrain(project: str = ".", wait_s: float = 0.0) -> dict[str, Any]:
    """Run the pipeline in PROJECT (``dvc repro``) under the retraining lock, then report the
    registry's decision (reports/registry.json). A second run skips, or waits ``wait_s``."""
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from prefect.runtime import flow_run

    root = Path(project).resolve()
    lock_path = root / LOCK
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        message = (f"skipped: another retraining run holds {lock_path} ({_holder(lock_path)}); this run changes "
                   f"nothing{f' (waited {wait_s:g} s)' if wait_s else ''}")
        print(message)
        return {"status": "skipped", "message": message}
    owner = lock_path.with_suffix(".owner.json")
    try:
        owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "flow_run": flow_run.id,
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        record = registry_record(root)
        before = record.read_bytes() if record.exists() else None
        # The stages run `python -m pipeline.<stage>`: this environment's python first on PATH.
        run_env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        if url := _api_url():
            run_env["PREFECT_API_URL"] = url
        print(f"retrain: dvc repro in {root}")
        t = time.perf_counter()
        try:
            ran = reproduce(root, run_env)
        except LockError:
            message = f"skipped: DVC's repo lock is held by another dvc process in {root}; nothing ran"
            print(message)
            return {"status": "skipped", "message": message, "seconds": round(time.perf_counter() - t, 1)}
        except DvcException as exc:
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            return Failed(message=f"dvc repro failed after {time.perf_counter() - t:.1f} s: {exc}{cause}")
        seconds = round(time.perf_counter() - t, 1)
        after = record.read_bytes() if record.exists() else None
        decision = json.loads(after) if after else None
        status = "ran" if ran else "up to date"
        result = {"status": status, "stages": ran, "seconds": seconds,
                  "new_decision": after is not None and after != before, "decision": decision}
        print(f"retrain: {f'ran {len(ran)} stage(s): ' + ', '.join(ran) if ran else 'every stage up to date'} "
              f"({seconds} s)")
        if decision is None:
            print(f"retrain: no registry decision yet ({record} is missing)")
        elif result["new_decision"]:
            print(f"retrain: new registry decision: {decision['model_name']} "
                  f"v{decision.get('version', '-')} {decision['outcome']}: {decision['reason']}; "
                  f"@{decision['alias']} -> v{decision.get('champion_version') or '-'}")
        else:
            print(f"retrain: no new model, the registry is unchanged "
                  f"(@{decision['alias']} -> v{decision.get('champion_version') or '-'})")
        return result
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def serve(name: str, cron: str, project: str) -> int:
    """Serve the flow on ``cron`` until interrupted. A schedule needs a Prefect server with its
    scheduler: the one PREFECT_API_URL names, else a local one started here for as long as this runs
    (Prefect's ephemeral server has no scheduler)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from aigc.services.prefect_server import start_server, stop_server

    def go() -> None:
        # limit=1: this process runs one retraining at a time; the file lock covers every other overlap
        retrain.serve(name=name, cron=cron, parameters={"project": project}, limit=1)

    if os.environ.get("PREFECT_API_URL"):
        go()
        return 0
    proc, url = start_server(services=True)
    print(f"Prefect server with scheduler at {url} (state in {os.environ['PREFECT_HOME']}); Ctrl-C stops both")
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            go()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.retrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="retrain once, now")
    p.add_argument("--project", default=".", help="the project folder (default: %(default)s)")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="if another run holds the lock, wait up to S seconds instead of skipping at once")
    p = sub.add_parser("serve", help="serve the flow on a cron schedule (blocks; Ctrl-C stops and pauses it)")
    p.add_argument("--cron", default="0 3 * * 1", help="cron schedule (default: %(default)r, Mondays 03:00)")
    p.add_argument("--name", default="aigc-retrain", help="deployment name (default: %(default)s)")
    p.add_argument("--project", default=".", help="the project folder (default: %(default)s)")
    args = parser.parse_args(argv)
    project = str(Path(args.project).resolve())
    if args.command == "serve":
        return serve(args.name, args.cron, project)
    state = retrain(project=project, wait_s=args.wait, return_state=True)
    if state.is_failed():
        print(f"error: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
