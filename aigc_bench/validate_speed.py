"""How long the data-quality gate takes on the default dataset (5,000 MNIST digits).

    python aigc_bench/validate_speed.py [--repeats 7]

Times the validate stage's function (pipeline.validate.validate: load data/raw, scan and scrub
metadata, the great-expectations suite on the per-record summary, summary JSON, HTML report,
scrubbed copy; MLflow off) in one process, several times, and reports the median. The first
call in a process also pays for importing great-expectations; that one-off cost is measured
apart, in fresh interpreters. Medians, never one time: the machine is shared and noisy (the
load average is recorded). Results go to reports/benchmarks/validate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "aigc_bench" / ".work" / "validate"
OUT = ROOT / "reports" / "benchmarks" / "validate.json"


def import_seconds(module: str, repeats: int = 3) -> float:
    """Median wall time of ``import module`` in a fresh interpreter."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    env = os.environ | {"GX_ANALYTICS_ENABLED": "False"}
    times = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  env=env, cwd=ROOT).stdout) for _ in range(repeats)]
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import pipeline  # noqa: F401  (the offline/quiet environment)
    from aigc.config import TrackingConfig, load_params
    from aigc.data.sources import load_source, save_raw
    from aigc.io import write_json

    params = load_params(ROOT / "params.yaml")
    raw = WORK / "raw"
    if not raw.exists():
        save_raw(load_source(params.data), raw)
    load_before = os.getloadavg()

    t = time.perf_counter()
    from aigc.quality.gate import run_gate
    from pipeline.validate import run_validate
    import_pipeline = time.perf_counter() - t

    def once() -> float:
        t = time.perf_counter()
        run_validate(params.data, params.validate, params.privacy, TrackingConfig(enabled=False), str(raw),
                 str(WORK / "validated"), str(WORK / "summary.json"), str(WORK / "report.html"))
        return time.perf_counter() - t

    first = once()  # pays for the lazy great-expectations import
    times = [once() for _ in range(args.repeats)]

    from aigc.data.sources import load_raw
    ds = load_raw(raw)
    gate_times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        run_gate(ds, params.validate, params.privacy, params.data.blank_std, None)
        gate_times.append(time.perf_counter() - t)
    load_after = os.getloadavg()
    gx_import = import_seconds("great_expectations")

    summary = json.loads((WORK / "summary.json").read_text())
    result = {
        "dataset": params.data.source,
        "records": summary["counts"]["records"],
        "expectations": summary["counts"]["expectations"],
        "passed": summary["passed"],
        "repeats": args.repeats,
        "validate_median_s": round(statistics.median(times), 3),
        "validate_min_s": round(min(times), 3),
        "validate_max_s": round(max(times), 3),
        "validate_times_s": [round(x, 3) for x in times],
        "gate_only_median_s": round(statistics.median(gate_times), 3),
        "first_call_in_process_s": round(first, 3),
        "great_expectations_import_s": round(gx_import, 3),
        "pipeline_import_s": round(import_pipeline, 3),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "great_expectations": version("great-expectations"),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(OUT, result)
    print(json.dumps(result, indent=2))
    print(f"validate on {result['records']} records: median {result['validate_median_s']} s over {args.repeats} runs "
          f"(gate alone {result['gate_only_median_s']} s; "
          f"first call in a process {result['first_call_in_process_s']} s; "
          f"`import great_expectations` alone in a fresh interpreter {result['great_expectations_import_s']} s); "
          f"wrote {OUT}")


if __name__ == "__main__":
    main()
