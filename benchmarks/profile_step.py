"""Where the train stage's step spends its time: a per-operator profile (torch.profiler) of the
step params.yaml configures, with FLOPs, on this machine.

    python -m benchmarks.profile_step [--steps 30] [--channels-last auto|true|false]

Writes reports/benchmarks/profile_step.md (and .json): each operator's share of the step's CPU
time, its achieved GFLOP/s where PyTorch counts FLOPs, beside the fp32 matmul peak measured in
the same run -- the table that says which layers keep the step from the hardware limit.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from aigc import machine
from aigc.training import train_gan
from benchmarks.train_speed import matmul_peak, mnist_like, stage_config

OUT = Path(__file__).resolve().parents[1] / "reports" / "benchmarks"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="profiled steps after 5 warm-up steps (default: %(default)s)")
    ap.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: all usable cores)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    from aigc.runtime import usable_cores

    threads = args.threads or usable_cores()
    net, cfg = stage_config()
    cl = {"auto": cfg.channels_last if cfg.channels_last != "auto" else machine.cpu()["isa"].startswith("avx512"),
          "true": True, "false": False}[args.channels_last]
    images = mnist_like(cfg.batch_size * (args.steps + 5))
    run = cfg.model_copy(update={"epochs": 1, "threads": threads, "channels_last": cl, "guard_steps": 0,
                                 "log_every": args.steps + 5})
    train_gan(run.model_copy(update={"log_every": 5}), net, images[: cfg.batch_size * 5], seed=0, progress=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=False) as prof:
        result = train_gan(run, net, images, seed=0, progress=False)
    peak = matmul_peak(threads)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total_self = sum(e.self_cpu_time_total for e in events)
    rows = []
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]:
        gflops = (e.flops / (e.cpu_time_total / 1e6) / 1e9) if e.flops and e.cpu_time_total else None
        rows.append({"op": e.key, "calls": e.count, "self_share": round(e.self_cpu_time_total / total_self, 4),
                     "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / result.steps, 2),
                     "gflop_per_s": round(gflops, 1) if gflops else None,
                     "of_peak": round(gflops / peak, 2) if gflops else None})
    report = {"machine": machine.describe(), "threads": threads, "channels_last": cl, "steps": result.steps,
              "images_per_s_profiled": round(result.images_per_s, 1), "matmul_peak_gflops": round(peak, 1),
              "architecture": f"{net.family} G {list(net.g_widths)} D {list(net.d_widths)} k{net.kernel}, "
                              f"batch {cfg.batch_size}, {cfg.loss}, EMA {cfg.ema_kimg > 0}", "ops": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "profile_step.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = ["# Where the step's time goes", "",
             f"`python -m benchmarks.profile_step`: {result.steps} steps of {report['architecture']}, "
             f"{threads} thread(s), {'channels_last' if cl else 'NCHW'}; {report['images_per_s_profiled']} img/s under "
             f"the profiler (it adds overhead). Machine: {machine.one_line(m)}; fp32 matmul peak {peak:.0f} GFLOP/s.", "",
             "| operator | calls | share of self CPU time | ms per step | GFLOP/s | of matmul peak |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| `{r['op']}` | {r['calls']} | {100 * r['self_share']:.1f}% | {r['self_ms_per_step']} | "
                     f"{r['gflop_per_s'] or ''} | {r['of_peak'] or ''} |")
    (OUT / "profile_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
