"""What Prefect costs per stage with a running Prefect server -- `make run`'s shared one, started and
handed to the stages as ``pipeline/prefect_server.py`` does: ``python -m aigc_bench.orchestration``
-> reports/benchmarks/orchestration.json.

Each stage of dvc.yaml runs, in a throwaway project (8x8 digits, one epoch), as DVC runs it --
``python -m pipeline.<stage> ...`` in a fresh process, a Prefect flow reporting to the server
(``PREFECT_API_URL``) -- and, interleaved, the same command with the stage function called
directly (``pipeline._stage.run_as_flow`` replaced by a plain call for that process: no Prefect
import, no server). The difference of the medians is the orchestration cost of that stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aigc import machine

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "benchmarks" / "orchestration.json"

# The stage without Prefect: run_as_flow becomes a plain call whose "state" is never failed.
PLAIN = """
import runpy, sys
import pipeline._stage as stage

class Done:
    message = None
    def is_failed(self):
        return False

def run_plain(fn, name, kwargs):
    fn(**kwargs)
    return Done()

stage.run_as_flow = run_plain
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def project(root: Path) -> Path:
    from tests.conftest import tiny_project

    return tiny_project(root)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m aigc_bench.orchestration", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs per stage and mode (default: %(default)s)")
    args = ap.parse_args()
    from aigc.services.prefect_server import SERVER_PID, start_server, stop_server

    load0, t0 = os.getloadavg(), time.time()
    with tempfile.TemporaryDirectory(prefix="aigc-orch-") as tmp:
        root = project(Path(tmp) / "project")
        os.environ["PREFECT_HOME"] = str(Path(tmp) / "prefect-home")
        # the server `make run` starts (pipeline/prefect_server.py), and the environment its stages get
        server, url = start_server()
        env = os.environ | {"PREFECT_API_URL": url, SERVER_PID: str(server.pid), "PYTHONPATH": str(root),
                            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
        result: dict[str, dict] = {}
        try:
            for name, spec in stages.items():
                argv = shlex.split(spec["cmd"])
                assert argv[:2] == ["python", "-m"], spec["cmd"]
                cmds = {"flow": [sys.executable, *argv[1:]],
                        "plain": [sys.executable, "-c", PLAIN, *argv[2:]]}
                times: dict[str, list[float]] = {"flow": [], "plain": []}
                for r in range(args.repeats):
                    for mode in ("flow", "plain") if r % 2 == 0 else ("plain", "flow"):
                        t = time.perf_counter()
                        res = subprocess.run(cmds[mode], cwd=root, env=env, capture_output=True, text=True)
                        if res.returncode != 0:
                            sys.exit(f"{name} ({mode}) failed:\n{res.stdout[-1500:]}\n{res.stderr[-1500:]}")
                        times[mode].append(time.perf_counter() - t)
                flow, plain = statistics.median(times["flow"]), statistics.median(times["plain"])
                result[name] = {"median_seconds_flow": round(flow, 2), "median_seconds_plain": round(plain, 2),
                                "orchestration_s": round(flow - plain, 2),
                                "all_seconds": {k: [round(x, 2) for x in v] for k, v in times.items()}}
                print(f"{name:16s} flow {flow:6.2f} s  plain {plain:6.2f} s  Prefect {flow - plain:+.2f} s", flush=True)
        finally:
            stop_server(server)
    costs = [v["orchestration_s"] for v in result.values()]
    report = {"what": "per-stage seconds: stage process as a Prefect flow on a running server minus the same "
                      "process calling the stage function directly (medians)",
              "machine": machine.describe(), "python": platform.python_version(), "load_average_before": load0,
              "load_average_after": os.getloadavg(), "benchmark_seconds": round(time.time() - t0, 1),
              "repeats": args.repeats, "stages": result,
              "median_orchestration_s_per_stage": round(statistics.median(costs), 2),
              "total_orchestration_s": round(sum(costs), 2)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"median per stage {report['median_orchestration_s_per_stage']} s, all {len(costs)} stages "
          f"{report['total_orchestration_s']} s -> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
