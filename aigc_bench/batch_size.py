"""The lever issue 15 leaves: how close the stage's step gets to the machine's fp32 matmul peak
at larger batches (same network and recipe otherwise), interleaved on one machine.

    python -m aigc_bench.batch_size [--sizes 64,128,256] [--rounds 2] [--isa avx2]

Writes reports/benchmarks/batch_size[_<isa>].{json,md}: per batch size the step's img/s, its
FLOPs (counted by PyTorch, per step and per image), the achieved GFLOP/s and its fraction of the
matmul peak measured in the same rounds. Speed only: a larger batch changes the recipe (fewer
optimiser steps per epoch), so its quality per minute is the time-to-quality benchmark's to say.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from aigc import machine
from aigc_bench import isa

OUT = Path(__file__).resolve().parents[1] / "reports" / "benchmarks"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m aigc_bench.batch_size", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128,256", help="batch sizes, comma-separated (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--images", type=int, default=2560, help="images per timed run (default: %(default)s)")
    isa.add_isa_argument(ap)
    args = ap.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        sys.exit(f"error: --sizes {args.sizes!r}: give whole numbers separated by commas, e.g. 64,128,256")
    if any(b < 8 or b > args.images // 5 for b in sizes):
        sys.exit(f"error: --sizes {args.sizes!r}: each batch must be 8..{args.images // 5} "
                 f"(--images {args.images} must hold at least 5 batches of the largest)")
    isa.under_cap(args.isa, "aigc_bench.batch_size")  # before torch is imported: the cap is read when it loads

    import torch

    from aigc.runtime import usable_cores
    from aigc_bench.train_speed import matmul_peak, mnist_like, project_step, stage_config, step_flops

    load0 = os.getloadavg()
    cores = usable_cores()
    net, cfg = stage_config()
    images = mnist_like(args.images)
    from aigc.config import load_params

    rt = load_params("params.yaml").runtime
    layout = rt.channels_last if rt.channels_last != "auto" else False  # one layout for all sizes
    flops = {b: step_flops(images, net, cfg.model_copy(update={"batch_size": b})) for b in sizes}
    speed: dict[int, list[float]] = {b: [] for b in sizes}
    peaks: list[float] = []
    for r in range(args.rounds):
        for b in sizes if r % 2 == 0 else sizes[::-1]:
            run = cfg.model_copy(update={"batch_size": b})
            speed[b].append(project_step(images, net, run, args.images // b, threads=cores, channels_last=layout))
        peaks.append(matmul_peak(cores))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{b}: {speed[b][-1]:.0f}" for b in sizes) + " img/s",
              file=sys.stderr)
    torch.set_num_threads(cores)
    peak = statistics.median(peaks)
    rows = []
    for b in sizes:
        img_s = statistics.median(speed[b])
        achieved = flops[b] / b * img_s / 1e9
        rows.append({"batch_size": b, "images_per_s": round(img_s, 1), "all_images_per_s": [round(x, 1) for x in speed[b]],
                     "gflop_per_step": round(flops[b] / 1e9, 2), "mflop_per_image": round(flops[b] / b / 1e6, 1),
                     "achieved_gflops": round(achieved, 1), "fraction_of_peak": round(achieved / peak, 3),
                     "vs_first": round(img_s / statistics.median(speed[sizes[0]]), 3)})
    env = machine.describe()
    report = {"machine": env, "cores": cores, "threads": cores, "channels_last": layout, "rounds": args.rounds,
              "images_per_run": args.images, "peak_gflops": round(peak, 1), "all_peaks": [round(p, 1) for p in peaks],
              "load_average_before": load0, "load_average_after": os.getloadavg(), "sizes": rows}
    suffix = machine.report_suffix()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"batch_size{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Step speed against batch size{' (' + suffix[1:] + ' kernels, ISA capped)' if suffix else ''}", "",
             f"`python -m aigc_bench.batch_size --sizes {args.sizes} --rounds {args.rounds}"
             f"{' --isa ' + args.isa if args.isa else ''}`: the stage's step (params.yaml's network and recipe, "
             f"{'channels_last' if layout else 'NCHW'}, {cores} threads), {args.images} images per timed run, "
             f"{args.rounds} interleaved rounds, medians; fp32 matmul peak {peak:.0f} GFLOP/s in the same rounds; "
             f"load average {load0[0]:.2f} before, {report['load_average_after'][0]:.2f} after.", "",
             f"Machine: {machine.one_line(env)}.", "",
             "Speed only: a larger batch is a different recipe (fewer optimiser steps per epoch); its quality "
             "per minute needs `python -m aigc_bench.time_to_quality`.", "",
             "| batch | img/s | vs batch " + str(sizes[0]) + " | GFLOP per step | MFLOP per image | achieved GFLOP/s "
             "| of matmul peak |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['batch_size']} | {r['images_per_s']:.0f} | {r['vs_first']:.2f}x | {r['gflop_per_step']} | "
              f"{r['mflop_per_image']} | {r['achieved_gflops']:.0f} | {r['fraction_of_peak']:.2f} |" for r in rows]
    (OUT / f"batch_size{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
