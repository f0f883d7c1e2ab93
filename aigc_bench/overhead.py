"""What orchestration (Prefect), tracking (MLflow) and DVC cost on top of the work itself.

* Tracking: the same short training in one process, with the MLflow hooks on a real SQLite
  store and without them, interleaved.
* Orchestration: a stage command line per repeat, in fresh processes, interleaved:
  ``python -m pipeline.preprocess`` (a Prefect flow, as DVC runs it) with its own ephemeral
  server, against a running server, and as ``make run`` runs the first stage (under
  ``python -m pipeline.prefect_server``, the server starting beside it), and the stage's plain
  function (no Prefect). Every stage process pays the same start-up, so the per-process
  figure times the number of stages, plus what the server's start-up adds to the first stage,
  is the pipeline's orchestration cost.
* DVC: a no-op ``dvc repro`` in the workspace (only when it is up to date).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=os.environ | (env or {}), capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t, res


def tracking_overhead(work: Path, rounds: int, steps: int = 40) -> dict[str, Any]:
    """Training images/s with and without MLflow logging (same process, interleaved)."""
    import torch

    from aigc.config import TrackingConfig
    from aigc.tracking import Run
    from aigc.training import train_gan
    from aigc_bench.train_speed import mnist_like, stage_config, step_labels
    from aigc.tracking.train_run import Recorder

    net, stage_cfg = stage_config()  # the train stage's own network and recipe
    images = mnist_like(stage_cfg.batch_size * steps)
    cfg = stage_cfg.model_copy(update={"epochs": 1, "guard_steps": 0})
    tracking = TrackingConfig(uri=f"sqlite:///{work / 'mlflow.db'}", artifact_root=str(work / "mlartifacts"))
    Run.start(tracking, "warm-up", {}, {}).end(True)  # create the store once, outside the timing

    seconds: dict[str, list[float]] = {"on": [], "off": []}
    in_mlflow: list[float] = []
    for r in range(rounds):
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
            run = Run.start(tracking, f"bench-{r}", {"x": 1}, {}) if mode == "on" else None
            rec = Recorder(run) if run else None
            result = train_gan(cfg, net, images, seed=0, progress=False, labels=step_labels(len(images), net),
                               on_steps=rec.on_steps if rec else None, on_epoch=rec.on_epoch if rec else None)
            seconds[mode].append(result.seconds)
            if run:
                run.end(True)
                in_mlflow.append(rec.tracking_seconds)
    torch.set_num_threads(os.cpu_count() or 1)
    on, off = statistics.median(seconds["on"]), statistics.median(seconds["off"])
    return {
        "steps": steps,
        "median_seconds_on": round(on, 2),
        "median_seconds_off": round(off, 2),
        "ratio_on_off": round(on / off, 4),
        "median_seconds_inside_mlflow_calls": round(statistics.median(in_mlflow), 3),
        "share_inside_mlflow_calls": round(statistics.median(in_mlflow) / on, 4),
        "all_seconds": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
    }


def orchestration_overhead(work: Path, repeats: int) -> dict[str, Any]:
    """Seconds one stage process pays for being a Prefect flow (ephemeral server included)."""
    from aigc_bench.orchestration import PLAIN
    from aigc.config import DataConfig
    from aigc.data.sources import load_source, save_raw

    raw = work / "raw"
    if not raw.exists():
        save_raw(load_source(DataConfig()), raw)
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(yaml.safe_load((ROOT / "params.yaml").read_text())))
    env = {"PREFECT_HOME": str(work / "prefect")}
    flow = [sys.executable, "-m", "pipeline.preprocess", "--params", str(params), "--raw", str(raw),
            "--out", str(work / "processed")]
    # the same process with the stage function called directly (no Prefect import, no flow)
    plain = [sys.executable, "-c", PLAIN, *flow[2:]]
    _timed(flow, env)  # Prefect creates its database once per home: not a per-stage cost
    os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]
    from aigc.services.prefect_server import SERVER_PID, start_server, stop_server

    t = time.perf_counter()
    server, url = start_server()  # what `make run` does: one server for every stage
    server_start_s = time.perf_counter() - t
    # `make run` starts the server beside the command and a stage waits for it only when its flow
    # begins: "wrapped" is the first stage as `make run` runs it (server start included), so
    # wrapped minus shared-server is what the server's start-up still adds to the run.
    modes = {"flow": (flow, env), "flow_shared_server": (flow, env | {"PREFECT_API_URL": url, SERVER_PID: str(server.pid)}),
             "flow_wrapped": ([sys.executable, "-m", "aigc.services.prefect_server", *flow], env), "plain": (plain, env)}
    times: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for r in range(repeats):
            for mode in list(modes) if r % 2 == 0 else list(modes)[::-1]:
                times[mode].append(_timed(*modes[mode])[0])
    finally:
        stop_server(server)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "stage": "preprocess",
        **{f"median_seconds_{m}": round(v, 2) for m, v in med.items()},
        "per_stage_process_s": round(med["flow"] - med["plain"], 2),
        "per_stage_shared_server_s": round(med["flow_shared_server"] - med["plain"], 2),
        "server_start_alone_s": round(server_start_s, 2),
        "shared_server_start_s": round(max(med["flow_wrapped"] - med["flow_shared_server"], 0.0), 2),
        "all_seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
    }


def noop_repro(repeats: int) -> dict[str, Any]:
    """A `dvc repro` with nothing to do, in the workspace (skipped when something would run)."""
    dvc = str(Path(sys.executable).with_name("dvc"))
    status = subprocess.run([dvc, "status", "--json"], cwd=ROOT, capture_output=True, text=True)
    if status.returncode != 0 or status.stdout.strip() not in ("{}", ""):
        return {"skipped": "the workspace is not up to date: run `dvc repro` (or make run) first"}
    times = [_timed([dvc, "repro"])[0] for _ in range(repeats)]
    return {"median_seconds": round(statistics.median(times), 2), "all_seconds": [round(t, 2) for t in times]}


def run(repeats: int = 3) -> dict[str, Any]:
    stages = len(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    with tempfile.TemporaryDirectory(prefix="aigc-bench-") as tmp:
        work = Path(tmp)
        result = {
            "tracking": tracking_overhead(work, repeats),
            "orchestration": orchestration_overhead(work, repeats),
            "noop_dvc_repro": noop_repro(repeats),
            "stages": stages,
        }
    metrics = ROOT / "reports" / "train" / "metrics.json"
    if metrics.exists():
        # The share of a default `dvc repro`: its training time from the last default run, MLflow's
        # share of it measured above, and one Prefect start-up per stage process. MLflow's share is
        # the on/off difference, or the time inside its calls when that is larger: the difference
        # of two short runs is noise and can come out below the direct measure, even negative.
        # `make run` shares one server; a bare `dvc repro` starts one per stage process.
        o, t = result["orchestration"], result["tracking"]
        train_s = json.loads(metrics.read_text())["seconds"]
        tracking_share = max(t["ratio_on_off"] - 1, t["share_inside_mlflow_calls"])
        tracking_s = tracking_share * train_s
        for name, prefect_s, per_stage in (
            ("make_run", o["shared_server_start_s"] + stages * o["per_stage_shared_server_s"],
             o["median_seconds_flow_shared_server"]),
            ("bare_dvc_repro", stages * o["per_stage_process_s"], o["median_seconds_flow"]),
        ):
            repro_s = train_s + stages * per_stage + (prefect_s if name == "make_run" else 0)
            result[f"default_repro_{name}"] = {
                "train_seconds": train_s,
                "estimated_repro_seconds": round(repro_s, 1),
                "prefect_seconds": round(prefect_s, 1),
                "mlflow_seconds": round(tracking_s, 1),
                "mlflow_share_of_training": round(tracking_share, 4),
                "overhead_share": round((prefect_s + tracking_s) / repro_s, 4),
            }
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
