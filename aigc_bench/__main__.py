"""One command for every speed figure: ``python -m aigc_bench`` (or ``make bench``).

Writes reports/benchmarks/train_speed.json, overhead.json and summary.md, and prints the
ratios. The machine is shared: the load average is recorded before and after, variants are
interleaved and only medians and ratios are quoted.

``--isa avx2`` (or ``avx512``) runs it all under a cap of PyTorch's CPU kernels (aigc/machine.py):
the process starts again with the cap's environment, so torch and every stage process it starts
load the capped kernels; the reports go beside the native ones (summary_avx2.md, ...), and say
they emulate the instruction set only, on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from aigc import machine
from aigc_bench import isa

OUT = Path(__file__).resolve().parents[1] / "reports" / "benchmarks"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m aigc_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per comparison (default: %(default)s)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (it compiles for ~1 min)")
    ap.add_argument("--stage-epochs", type=int, default=2,
                    help="epochs of the train stage timed against the in-process step (0: skip; default: %(default)s)")
    isa.add_isa_argument(ap)
    args = ap.parse_args()
    isa.under_cap(args.isa, "aigc_bench")  # before torch is imported: the cap is read when it loads
    from aigc_bench import overhead, train_speed

    start, load0 = time.time(), os.getloadavg()
    env = {"machine": machine.describe(), "load_average_before": load0}
    suffix = machine.report_suffix()
    print(f"machine: {machine.one_line(env['machine'])}")

    speed = train_speed.run(rounds=args.rounds, compile_check=not args.no_compile, stage_epochs=args.stage_epochs)
    over = overhead.run(repeats=args.rounds)
    env |= {"load_average_after": os.getloadavg(), "benchmark_seconds": round(time.time() - start, 1)}

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"train_speed{suffix}.json").write_text(json.dumps(env | speed, indent=2) + "\n")
    (OUT / f"overhead{suffix}.json").write_text(json.dumps(env | over, indent=2) + "\n")
    m, t, o = speed["median"], over["tracking"], over["orchestration"]
    rows = [
        ("project step (img/s)", f"{m['project']:.0f}", ""),
        ("reference loop (img/s)", f"{m['reference']:.0f}", f"project / reference = {speed['speedup_vs_reference']:.2f}x (target >= 1.1)"),
        ("step GFLOP / achieved GFLOP/s", f"{speed['gflop_per_step']:.1f} / {speed['achieved_gflops']:.0f}", ""),
        ("fp32 matmul peak (GFLOP/s)", f"{m['peak_gflops']:.0f}", f"step / peak = {speed['fraction_of_peak']:.2f} (target >= 0.85)"),
        ("channels_last / NCHW, the stage's step", f"{m['nhwc']:.0f} / {m['nchw']:.0f}",
         f"{speed['channels_last_ratio']:.2f}x; train.channels_last = {speed['channels_last_setting']} -> "
         f"{'channels_last' if speed['channels_last_chosen'] else 'NCHW'} "
         f"({speed['chosen_layout_vs_best']:.2f}x the faster layout)"),
        ("torch.compile", "", f"{speed['compile_ratio']:.2f}x the default step" if speed["compile_ratio"] else "skipped"),
        ("one core busy: all threads / 1 / auto (img/s)",
         " / ".join(f"{speed['one_core_busy'].get(k, 0):.0f}" for k in ("threads_all", "threads_1", "threads_auto")),
         f"auto / 1 thread = {speed['auto_vs_1_thread_under_load']}" if speed["auto_vs_1_thread_under_load"] else ""),
        ("MLflow tracking", f"{t['median_seconds_on']:.1f} s vs {t['median_seconds_off']:.1f} s",
         f"{100 * (t['ratio_on_off'] - 1):+.1f}% ({100 * t['share_inside_mlflow_calls']:.1f}% inside MLflow calls; target <= 3%)"),
        ("Prefect per stage process, ephemeral server (bare `dvc repro`)",
         f"{o['median_seconds_flow']:.1f} s vs {o['median_seconds_plain']:.1f} s plain",
         f"{o['per_stage_process_s']:.1f} s per stage"),
        ("Prefect per stage process, shared server (`make run`)",
         f"{o['median_seconds_flow_shared_server']:.1f} s vs {o['median_seconds_plain']:.1f} s plain",
         f"{o['per_stage_shared_server_s']:.1f} s per stage + {o['shared_server_start_s']:.1f} s once "
         f"(the server starts in {o['server_start_alone_s']:.1f} s, beside the first stage)"),
    ]
    st = speed.get("stage_vs_step")
    if st:
        rows.insert(1, (f"train stage (`python -m pipeline.train`, {st['epochs']} epochs) / train_gan in-process",
                        f"{st['median_img_s']['stage']:.0f} / {st['median_img_s']['in_process']:.0f} img/s",
                        f"stage / step = {st['stage_over_step']:.2f} (target: within 10%)"))
    noop = over["noop_dvc_repro"]
    rows.append(("no-op dvc repro", f"{noop['median_seconds']:.1f} s" if "median_seconds" in noop else "skipped",
                 noop.get("skipped", "")))
    for name, label in (("make_run", "`make run`"), ("bare_dvc_repro", "bare `dvc repro`")):
        if f"default_repro_{name}" in over:
            d = over[f"default_repro_{name}"]
            rows.append((f"Prefect + MLflow share of a default run, {label} ({over['stages']} stages)",
                         f"{d['prefect_seconds'] + d['mlflow_seconds']:.0f} s of ~{d['estimated_repro_seconds']:.0f} s "
                         f"(Prefect {d['prefect_seconds']:.0f} s, MLflow {d['mlflow_seconds']:.0f} s)",
                         f"{100 * d['overhead_share']:.1f}% (target <= 5%)"))
    mc = env["machine"]
    k = mc["isa_in_force"]
    cap = ([f"**Capped kernels: {k['caveat']}.** PyTorch's CPU kernels ran capped (ATen {k['aten']}, "
            f"oneDNN {k['onednn']}, MKL {k['mkl']}): an emulation of the instruction set only, on this CPU's "
            f"clocks, caches and microarchitecture, not a measurement of an {machine.PRETTY[k['level']]} machine.", ""]
           if k["emulated"] else [])
    lines = [f"# Benchmarks{' (' + k['level'] + ' kernels, ISA capped)' if k['emulated'] else ''}", "", *cap,
             f"`python -m aigc_bench{' --isa ' + args.isa if args.isa else ''}`, {args.rounds} interleaved rounds, medians; {mc['cores_usable']} usable cores, "
             f"load average {load0[0]:.2f} before and {env['load_average_after'][0]:.2f} after; "
             f"{env['benchmark_seconds']:.0f} s in all.", "",
             f"Machine: {mc['cpu_model']}, {mc['isa']} (flags: {' '.join(mc['vector_flags'])}); torch {mc['torch']}, "
             f"oneDNN {mc['onednn']}, PyTorch CPU capability {mc['torch_cpu_capability']}; {machine.kernels_line(mc)}.", "",
             f"Step: {speed['architecture']}, batch {speed['batch_size']}.", "",
             "| measure | value | ratio |", "| --- | --- | --- |", *[f"| {a} | {b} | {c} |" for a, b, c in rows]]
    (OUT / f"summary{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
