"""Where the train stage's step spends its time: a per-operator profile (torch.profiler) of the
step params.yaml configures, with FLOPs, on this machine.

    python -m aigc_bench.profile_step [--steps 30] [--channels-last auto|true|false] [--isa avx2]

Writes reports/benchmarks/profile_step.md (and .json): each operator's share of the step's CPU
time, its achieved GFLOP/s where PyTorch counts FLOPs, beside the fp32 matmul peak measured in
the same run -- the table that says which layers keep the step from the hardware limit. Under
``--isa avx2`` (kernels capped, aigc/machine.py) it writes profile_step_avx2.md beside it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from aigc import machine
from aigc_bench import isa

OUT = Path(__file__).resolve().parents[1] / "reports" / "benchmarks"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m aigc_bench.profile_step", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="profiled steps after 5 warm-up steps (default: %(default)s)")
    ap.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: all usable cores)")
    ap.add_argument("--top", type=int, default=15)
    isa.add_isa_argument(ap)
    args = ap.parse_args()
    isa.under_cap(args.isa, "aigc_bench.profile_step")  # before torch is imported: the cap is read when it loads
    from torch.profiler import ProfilerActivity, profile

    from aigc.runtime import usable_cores
    from aigc.config import RuntimeConfig, load_params
    from aigc.training import GANRecipe, TrainData, probe_machine, train_gan
    from aigc_bench.train_speed import matmul_peak, mnist_like, stage_config, step_labels

    threads = args.threads or usable_cores()
    net, cfg = stage_config()
    images = mnist_like(cfg.batch_size * (args.steps + 5))
    labels = step_labels(len(images), net)  # a conditional default net trains with the class
    stage_rt = load_params("params.yaml").runtime
    if args.channels_last == "auto" and stage_rt.channels_last == "auto":  # the layout the stage would run: the probe's
        cl = probe_machine(cfg, stage_rt, GANRecipe(cfg, net), TrainData(images, labels), seed=0).channels_last
    else:
        cl = {"auto": stage_rt.channels_last, "true": True, "false": False}[args.channels_last]
    run = cfg.model_copy(update={"epochs": 1, "guard_steps": 0})
    rt = RuntimeConfig(threads=threads, channels_last=cl, log_every=args.steps + 5)
    train_gan(run, net, images[: cfg.batch_size * 5], seed=0, progress=False, runtime=rt.model_copy(update={"log_every": 5}),
              labels=None if labels is None else labels[: cfg.batch_size * 5])  # warm-up
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=False) as prof:
        result = train_gan(run, net, images, seed=0, progress=False, labels=labels, runtime=rt)
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
    # The ops PyTorch counts FLOPs for (forward convolutions and matmuls; not their backward passes),
    # by inclusive time: how close the compute-bound layers come to the peak.
    flop_rows = [{"op": e.key, "calls": e.count, "ms_per_step": round(e.cpu_time_total / 1e3 / result.steps, 2),
                  "gflop_per_step": round(e.flops / 1e9 / result.steps, 3),
                  "gflop_per_s": round(e.flops / (e.cpu_time_total / 1e6) / 1e9, 1),
                  "of_peak": round(e.flops / (e.cpu_time_total / 1e6) / 1e9 / peak, 2)}
                 for e in sorted(events, key=lambda e: e.flops or 0, reverse=True)
                 if e.flops and e.cpu_time_total and ("conv" in e.key or "mm" in e.key)]
    report = {"machine": machine.describe(), "threads": threads, "channels_last": cl, "steps": result.steps,
              "images_per_s_profiled": round(result.images_per_s, 1), "matmul_peak_gflops": round(peak, 1),
              "architecture": f"{net.family} G {list(net.g_widths)} D {list(net.d_widths)} k{net.kernel}, "
                              f"batch {cfg.batch_size}, {cfg.loss}, EMA {cfg.ema_kimg > 0}", "ops": rows,
              "flop_ops": flop_rows}
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = machine.report_suffix()
    (OUT / f"profile_step{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    k = m["isa_in_force"]
    lines = [f"# Where the step's time goes{' (' + k['level'] + ' kernels, ISA capped)' if k['emulated'] else ''}", "",
             *([f"**Capped kernels: {k['caveat']}**: an emulation of the instruction set only.", ""]
               if k["emulated"] else []),
             f"`python -m aigc_bench.profile_step{' --isa ' + args.isa if args.isa else ''}`: {result.steps} steps of {report['architecture']}, "
             f"{threads} thread(s), {'channels_last' if cl else 'NCHW'}; {report['images_per_s_profiled']} img/s under "
             f"the profiler (it adds overhead). Machine: {machine.one_line(m)}; fp32 matmul peak {peak:.0f} GFLOP/s.", "",
             "| operator | calls | share of self CPU time | ms per step | GFLOP/s | of matmul peak |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| `{r['op']}` | {r['calls']} | {100 * r['self_share']:.1f}% | {r['self_ms_per_step']} | "
                     f"{r['gflop_per_s'] or ''} | {r['of_peak'] or ''} |")
    lines += ["", "The operators PyTorch counts FLOPs for (forward convolutions and matmuls; backward passes are "
              "not counted), inclusive time:", "",
              "| operator | calls | ms per step (inclusive) | GFLOP per step | GFLOP/s | of matmul peak |",
              "| --- | --- | --- | --- | --- | --- |",
              *[f"| `{r['op']}` | {r['calls']} | {r['ms_per_step']} | {r['gflop_per_step']} | {r['gflop_per_s']} | "
                f"{r['of_peak']} |" for r in flop_rows]]
    (OUT / f"profile_step{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
