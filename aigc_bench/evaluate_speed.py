"""How long the evaluate stage takes for the default 10,000 samples on the default data.

    python aigc_bench/evaluate_speed.py [--repeats 3] [--num-samples 10000] \
        [--generator G.pt --evaluator E.pt --processed DIR]

Reads the evaluate stage's paths from dvc.yaml (the generator, the evaluator, the processed data)
and never writes there: outputs, the real-data cache and a throwaway MLflow store live in a
temporary folder. When the evaluator file does not exist yet it trains one there with params.yaml's
``evaluator`` section, and records that training's time and test accuracy too.

Measured, in this process, with the stage's own function (no Prefect): one cold evaluation (empty
cache: the real splits are embedded) and ``--repeats`` warm ones (cache filled: the normal case);
the median of the warm ones is the figure. Then one full stage process (``python -m
pipeline.evaluate``: interpreter, imports, Prefect's ephemeral server) for the end-to-end wall time.
Then the register stage's function with re-scoring: the generator is registered as the champion
of a throwaway MLflow store, a perturbed copy of it is evaluated and registered as the candidate,
and the champion is fetched back and re-scored (``seconds.rescore_champion`` of registry.json).
The CPU model, its vector flags and the load average are recorded beside: the machine is shared.
Results: reports/benchmarks/evaluate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aigc import machine
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "benchmarks"
sys.path.insert(0, str(ROOT))


def stage_paths() -> dict[str, str]:
    """The evaluate stage's --flag PATH pairs, as dvc.yaml gives them."""
    cmd = shlex.split(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]["cmd"])
    return {a[2:].replace("-", "_"): b for a, b in zip(cmd, cmd[1:]) if a.startswith("--")}


def time_register(params: Any, cfg: Any, paths: dict[str, str], given: dict[str, str], work: Path) -> dict[str, Any]:
    """The register stage on a throwaway store: the generator as champion, a perturbed copy as the
    candidate; the second registration re-scores the champion."""
    import torch

    from aigc.config import TrackingConfig
    from aigc.models import generator_payload, load_generator
    from aigc.tracking import Run
    from pipeline.evaluate import run_evaluate as evaluate
    from pipeline.register import run_register as register

    tracking = TrackingConfig(uri=f"sqlite:///{work / 'registry.db'}", experiment="bench-register",
                              artifact_root=str(work / "registry-art"))
    (work / "gate.json").write_text(json.dumps({"passed": True}))
    G, net = load_generator(paths["generator"] if "generator" in paths else given["generator"])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    (work / "candidate").mkdir()
    torch.save(generator_payload(G, net), work / "candidate" / "generator.pt")
    out: dict[str, Any] = {}
    for name, gen in (("champion", given["generator"]), ("candidate", str(work / "candidate" / "generator.pt"))):
        d = work / f"reg-{name}"
        d.mkdir(exist_ok=True)
        run = Run.start(tracking, name, {}, {})
        run.end(True)
        (d / "run.json").write_text(json.dumps(run.info() | {"params": {}}))
        outs = {k: str(d / f) for k, f in (("metrics", "metrics.json"), ("summary", "evaluation.json"),
                                           ("samples", "s.png"), ("nearest", "n.png"), ("classes", "c.png"),
                                            ("labels", "l.png"))}
        evaluate(cfg, tracking, gen, paths["evaluator"], paths["processed"], str(d / "run.json"), paths["cache_dir"], **outs)
        t = time.perf_counter()
        # gates off: the figure is the time of a comparison, whatever the generator's quality
        reg_cfg = params.register.model_copy(update={"min_modes_covered": 0.0, "min_dcr_score": 0.0,
                                                     "max_copy_share": 1.0})
        rec = register(reg_cfg, cfg, tracking, gen, paths["evaluator"], paths["processed"], paths["cache_dir"],
                       str(d / "run.json"), outs["metrics"], str(work / "gate.json"), str(d / "registry.json"))
        out[name] = {"wall_seconds": round(time.perf_counter() - t, 2), "outcome": rec["outcome"],
                     "reason": rec["reason"], "seconds": rec.get("seconds")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=10_000)
    for name in ("generator", "evaluator", "processed"):
        parser.add_argument(f"--{name}", help="default: the evaluate stage's, from dvc.yaml")
    args = parser.parse_args()

    import torch

    from aigc.config import TrackingConfig, load_params
    from aigc.tracking import Run
    from pipeline.evaluate import run_evaluate as evaluate
    from pipeline.train_evaluator import run_train_evaluator as train_evaluator

    params = load_params(ROOT / "params.yaml")
    cfg = params.evaluate.model_copy(update={"num_samples": args.num_samples})
    given = {k: str(ROOT / v) for k, v in stage_paths().items()}
    given |= {k: str(Path(getattr(args, k)).resolve()) for k in ("generator", "evaluator", "processed") if getattr(args, k)}
    result: dict[str, Any] = {"num_samples": args.num_samples, "cpu_count": os.cpu_count(), "machine": machine.describe(),
                              "torch_threads": torch.get_num_threads(), "load_average_before": os.getloadavg()}

    with tempfile.TemporaryDirectory(prefix="aigc-eval-bench-") as tmp:
        work = Path(tmp)
        paths = {k: given[k] for k in ("generator", "evaluator", "processed")}
        if not Path(paths["evaluator"]).exists():
            paths["evaluator"] = str(work / "evaluator.pt")
            t = time.perf_counter()
            summary = train_evaluator(params.seed, params.evaluator, paths["processed"], paths["evaluator"],
                                      str(work / "evaluator.json"), evaluate=params.evaluate)
            result["evaluator_training"] = summary | {"wall_seconds": round(time.perf_counter() - t, 2)}
        tracking = TrackingConfig(uri=f"sqlite:///{work / 'mlflow.db'}", experiment="bench",
                                  artifact_root=str(work / "art"))
        run = Run.start(tracking, "bench", {}, {})
        run.end(True)
        (work / "run.json").write_text(json.dumps(run.info()))
        paths |= {"run": str(work / "run.json"), "cache_dir": str(work / "cache")}

        def once(i: int) -> float:
            out = work / f"out{i}"
            outs = {k: str(out / Path(v).name) for k, v in given.items()
                    if k in ("metrics", "summary", "samples", "nearest", "classes", "labels")}
            t = time.perf_counter()
            report = evaluate(cfg, tracking, **paths, **outs)
            result.setdefault("metrics", report)
            return time.perf_counter() - t

        cold = once(0)
        warm = [once(i + 1) for i in range(args.repeats)]
        result["seconds_cold_cache"] = round(cold, 2)
        result["seconds_warm_cache"] = [round(s, 2) for s in warm]
        result["median_seconds_warm_cache"] = round(statistics.median(warm), 2)
        result["breakdown_last"] = json.loads((work / f"out{args.repeats}" / Path(given["summary"]).name)
                                              .read_text())["seconds"]

        # The whole stage process, as DVC runs it (warm cache).
        pf = work / "params.yaml"
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        raw["evaluate"]["num_samples"] = args.num_samples
        raw["tracking"] |= {"uri": tracking.uri, "experiment": "bench", "artifact_root": tracking.artifact_root}
        pf.write_text(yaml.safe_dump(raw))
        flags = [f"--{k.replace('_', '-')}" for k in given]
        values = [paths.get(k, str(work / "proc" / Path(v).name)) for k, v in given.items()]
        cmd = [sys.executable, "-m", "pipeline.evaluate", "--params", str(pf)]
        cmd += [x for pair in zip(flags, values) for x in pair]
        env = os.environ | {"PREFECT_HOME": str(work / "prefect")}
        # Twice: the first in a fresh Prefect home also creates Prefect's database (once per home).
        result["stage_process_seconds"] = []
        for _ in range(2):
            t = time.perf_counter()
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            result["stage_process_seconds"].append(round(time.perf_counter() - t, 2))
            if res.returncode != 0:
                sys.exit(f"stage process failed:\n{res.stderr[-3000:]}")
        result["register_with_rescoring"] = time_register(params, cfg, paths, given, work)
    result["load_average_after"] = os.getloadavg()

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "evaluate.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2))


if __name__ == "__main__":
    main()
