"""What orchestration (Prefect) and tracking (MLflow) cost on top of the work itself.

    python benchmarks/overhead.py [--repeats 3]

For each stage, the same command line runs twice per repeat, interleaved, in fresh processes:
``python -m pipeline.<stage>`` (a Prefect flow, as DVC runs it) and the stage's plain function
(no Prefect). Training runs 1 epoch on the default data, with and without MLflow tracking.
Medians and ratios, never one time: the machine is shared and noisy (the load average is
recorded). Results go to reports/benchmarks/overhead.{json,md}; the share of a default
``dvc repro`` uses the training time recorded in reports/train/metrics.json when present.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work"
OUT = ROOT / "reports" / "benchmarks"

PLAIN = {  # the stage's function without Prefect, in a fresh interpreter like the flow gets
    "ingest": "from pipeline.ingest import ingest as f; f(p.data, a[0])",
    "preprocess": "from pipeline.preprocess import preprocess as f; f(p.seed, p.data, a[0], a[1])",
    "train": "from pipeline.train import train as f; f(p.seed, p.model, p.train, p.tracking, *a)",
}


def stage_args(stage: str) -> list[str]:
    w = WORK
    return {
        "ingest": [str(w / "raw")],
        "preprocess": [str(w / "raw"), str(w / "processed")],
        "train": [str(w / "processed"), str(w / "generator.pt"), str(w / "checkpoint.pt"), str(w / "run.json"),
                  str(w / "metrics.json"), str(w / "losses.csv"), str(w / "samples.png")],
    }[stage]


FLAGS = {"ingest": ["--out"], "preprocess": ["--raw", "--out"],
         "train": ["--processed", "--generator", "--checkpoint", "--run", "--metrics", "--losses", "--samples"]}


def timed(cmd: list[str]) -> float:
    env = os.environ | {"PREFECT_HOME": str(WORK / "prefect")}
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["epochs"] = 1
    params["tracking"]["uri"] = f"sqlite:///{WORK / 'mlflow.db'}"
    params["tracking"]["artifact_root"] = str(WORK / "mlartifacts")
    for name, enabled in (("on", True), ("off", False)):
        params["tracking"]["enabled"] = enabled
        (WORK / f"params-{name}.yaml").write_text(yaml.safe_dump(params))

    def flow_cmd(stage: str, tracking: str = "on") -> list[str]:
        argv = [x for pair in zip(FLAGS[stage], stage_args(stage)) for x in pair]
        return [sys.executable, "-m", f"pipeline.{stage}", "--params", str(WORK / f"params-{tracking}.yaml"), *argv]

    def plain_cmd(stage: str, tracking: str = "on") -> list[str]:
        code = ("import sys; from aigc.config import load_params; p = load_params(sys.argv[1]); a = sys.argv[2:]; "
                + PLAIN[stage])
        return [sys.executable, "-c", code, str(WORK / f"params-{tracking}.yaml"), *stage_args(stage)]

    timed(flow_cmd("ingest"))  # warm-up: Prefect's database is created once per home
    timed(flow_cmd("preprocess"))
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for stage in ("ingest", "preprocess", "train"):
            pair = [("flow", flow_cmd(stage)), ("plain", plain_cmd(stage))]
            for mode, cmd in pair if r % 2 == 0 else pair[::-1]:  # alternate which goes first
                times.setdefault(f"{stage}/{mode}", []).append(timed(cmd))
        pair = [("tracking_on", plain_cmd("train", "on")), ("tracking_off", plain_cmd("train", "off"))]
        for mode, cmd in pair if r % 2 == 0 else pair[::-1]:
            times.setdefault(f"train/{mode}", []).append(timed(cmd))
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}

    per_stage = {s: med[f"{s}/flow"] - med[f"{s}/plain"] for s in ("ingest", "preprocess", "train")}
    orchestration = sum(per_stage.values())
    tracking = med["train/tracking_on"] - med["train/tracking_off"]
    train_metrics = ROOT / "reports" / "train" / "metrics.json"
    default_train_s = json.loads(train_metrics.read_text())["seconds"] if train_metrics.exists() else None
    one_epoch_s = json.loads((WORK / "metrics.json").read_text())["seconds"]  # the last 1-epoch training
    result = {
        "repeats": args.repeats,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "median_seconds": {k: round(v, 2) for k, v in med.items()},
        "all_seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "prefect_overhead_per_stage_s": {k: round(v, 2) for k, v in per_stage.items()},
        "prefect_overhead_total_s": round(orchestration, 2),
        "mlflow_overhead_1_epoch_s": round(tracking, 2),
        "mlflow_overhead_ratio_1_epoch": round(tracking / (med["train/tracking_off"]), 4),
        "default_train_seconds": default_train_s,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Orchestration and tracking overhead",
        "",
        f"{args.repeats} interleaved repeats, medians; load average {load_before[0]:.2f} before, "
        f"{result['load_average_after'][0]:.2f} after; {os.cpu_count()} CPUs.",
        "",
        "| stage | Prefect flow (s) | plain function (s) | Prefect overhead (s) |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {s} | {med[f'{s}/flow']:.1f} | {med[f'{s}/plain']:.1f} | {per_stage[s]:.1f} |" for s in per_stage],
        "",
        f"Training 1 epoch, plain function: tracking on {med['train/tracking_on']:.1f} s, off "
        f"{med['train/tracking_off']:.1f} s: MLflow costs {tracking:.2f} s "
        f"({100 * result['mlflow_overhead_ratio_1_epoch']:.1f}%, within the noise when near 0).",
    ]
    if default_train_s:
        # A default repro: the three stage processes as measured, with the real training time
        # in place of the 1-epoch one.
        repro_s = med["ingest/flow"] + med["preprocess/flow"] + med["train/flow"] - one_epoch_s + default_train_s
        share = (orchestration + max(tracking, 0.0)) / repro_s
        result |= {"default_repro_estimate_s": round(repro_s, 1), "overhead_share_of_default_repro": round(share, 4)}
        lines.append(f"\nA default `dvc repro` (training {default_train_s:.0f} s, from reports/train/metrics.json) "
                     f"takes about {repro_s:.0f} s; Prefect + MLflow are {100 * share:.1f}% of it.")
        (OUT / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
