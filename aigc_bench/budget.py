"""The training budget of the default: how many epochs fit in 8 minutes on the slowest 2-core CPU
the project has measured (a 2-core AMD EPYC, Zen 3, AVX2 without AVX-512), estimated from FLOPs.

    python -m aigc_bench.budget [--minutes 8] [--rounds 3] [--isa avx2]

That machine cannot be measured here. What was measured on it: the train stage of `make run`
drew **106 img/s** with the 2015 DCGAN recipe of that time (5x5 kernels, G 256-128-64, D
64-128-256, BCE, batch 64; issue 9). So its achieved rate on that step was 106 x the step's FLOPs
per image. The default's img/s there is estimated as

    that machine's GFLOP/s on the reference step x (default's efficiency / reference's efficiency)
    / default's FLOPs per image

where "efficiency" is the achieved GFLOP/s of each step measured here, interleaved, at the
kernels in force (``--isa avx2`` runs the AVX2 code paths, as on that machine): a small network
keeps the CPU's vector units busy for less of its step than a large one, so its FLOPs alone would
promise too much (the "FLOPs only" column says how much). Then the epochs that fit:
``minutes x 60 x img/s / training images``.

Writes reports/benchmarks/budget[_<isa>].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from aigc import machine
from aigc_bench import isa

OUT = Path(__file__).resolve().parents[1] / "reports" / "benchmarks"
# The slowest 2-core CPU without AVX-512 the project has measured (issue 9's fresh-clone `make run`).
SLOW = {"cpu": "2-core AMD EPYC (Zen 3), AVX2, no AVX-512", "images_per_s": 106.0,
        "recipe": "today (dcgan 5x5, BCE)", "measured": "the train stage's img/s in a fresh clone's make run (issue 9)"}
def epoch_images(batch_size: int, seed: int) -> int:
    """Images one epoch of the default data trains on: its train split (preprocessed as the stage
    does), in whole batches (4,500 -> 70 x 64 = 4,480 at batch 64)."""
    from aigc.config import DataConfig
    from aigc.data.preprocess import preprocess
    from aigc.data.sources import load_source

    n = len(preprocess(load_source(DataConfig()), DataConfig(), seed=seed).train["images"])
    return n // batch_size * batch_size


def epochs_within(minutes: float, images_per_s: float, train_images: int) -> int:
    """Whole epochs of ``train_images`` that fit in ``minutes`` at ``images_per_s`` (at least 0)."""
    return max(0, math.floor(minutes * 60 * images_per_s / train_images))


def estimate(slow_img_s: float, ref_flops_per_image: float, ref_img_s: float, default_flops_per_image: float,
             default_img_s: float) -> dict[str, float]:
    """The default's img/s on the slow machine from its FLOPs: the slow machine's GFLOP/s on the
    reference step, scaled by the two steps' efficiencies measured here (``*_img_s``), and the
    FLOPs-only figure (equal efficiency) beside it."""
    slow_gflops = slow_img_s * ref_flops_per_image / 1e9
    eff_ratio = (default_img_s * default_flops_per_image) / (ref_img_s * ref_flops_per_image)
    return {"slow_gflops": slow_gflops, "efficiency_ratio": eff_ratio,
            "flops_only_img_s": slow_gflops * 1e9 / default_flops_per_image,
            "img_s": slow_gflops * eff_ratio * 1e9 / default_flops_per_image}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m aigc_bench.budget", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=8.0, help="training time on the slow machine (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--images", type=int, default=1920, help="images per timed run (default: %(default)s)")
    isa.add_isa_argument(ap)
    args = ap.parse_args()
    if args.minutes <= 0 or args.rounds < 1:
        sys.exit("error: --minutes must be > 0 and --rounds >= 1")
    isa.under_cap(args.isa, "aigc_bench.budget")  # before torch is imported: the cap is read when it loads

    from aigc.config import load_params
    from aigc.models import net_config
    from aigc.runtime import usable_cores
    from aigc_bench.time_to_quality import ROOT, recipe
    from aigc_bench.train_speed import mnist_like, project_step, stage_config, step_flops

    load0 = os.getloadavg()
    cores = usable_cores()
    params = load_params(ROOT / "params.yaml")
    default_net, default_cfg = stage_config()
    ref_model, ref_cfg = recipe(params, SLOW["recipe"])
    ref_net = net_config(ref_model, {"resolution": [28, 28], "channels": 1})
    images = mnist_like(args.images)
    steps = {"reference": (ref_net, ref_cfg), "default": (default_net, default_cfg)}
    flops = {k: step_flops(images, n, c) / c.batch_size for k, (n, c) in steps.items()}
    speed: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        for k in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            n, c = steps[k]
            speed[k].append(project_step(images, n, c, args.images // c.batch_size, threads=cores, channels_last=False))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in speed.items()) + " img/s",
              file=sys.stderr)
    img_s = {k: statistics.median(v) for k, v in speed.items()}
    per_epoch = epoch_images(default_cfg.batch_size, params.seed)
    est = estimate(SLOW["images_per_s"], flops["reference"], img_s["reference"], flops["default"], img_s["default"])
    epochs = epochs_within(args.minutes, est["img_s"], per_epoch)
    report: dict[str, Any] = {
        "machine": machine.describe(), "cores": cores, "rounds": args.rounds, "images_per_run": args.images,
        "load_average_before": load0, "load_average_after": os.getloadavg(), "minutes": args.minutes,
        "slow_machine": SLOW, "train_images": per_epoch, "configured_epochs": default_cfg.epochs,
        "steps": {k: {"mflop_per_image": round(flops[k] / 1e6, 1), "images_per_s": round(img_s[k], 1),
                      "all_images_per_s": [round(x, 1) for x in speed[k]],
                      "achieved_gflops": round(flops[k] * img_s[k] / 1e9, 1), "batch_size": steps[k][1].batch_size}
                  for k in steps},
        "estimate": {k: round(v, 3) for k, v in est.items()},
        "epochs_within": epochs, "flops_only_epochs_within": epochs_within(args.minutes, est["flops_only_img_s"], per_epoch),
        "configured_minutes_there": round(default_cfg.epochs * per_epoch / est["img_s"] / 60, 2),
    }
    suffix = machine.report_suffix()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"budget{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report, " ".join(["python -m aigc_bench.budget", *sys.argv[1:]]))
    (OUT / f"budget{suffix}.md").write_text(md)
    print(md)


def markdown(r: dict[str, Any], command: str) -> str:
    m, s, e = r["machine"], r["steps"], r["estimate"]
    lines = [f"# The default's training budget on the slow machine (`{command}`)", "",
             f"Measured here: {m['cpu_model']}, {m['isa']} (flags: {' '.join(m['vector_flags'])}), {r['cores']} cores, "
             f"torch {m['torch']}; {machine.kernels_line(m)}; NCHW, {r['cores']} threads; {r['rounds']} interleaved rounds, medians; load average {r['load_average_before'][0]:.2f} "
             f"before, {r['load_average_after'][0]:.2f} after.", "",
             "| step | batch | MFLOP per image | img/s here | achieved GFLOP/s here |", "| --- | --- | --- | --- | --- |"]
    for k, v in s.items():
        lines.append(f"| {k} | {v['batch_size']} | {v['mflop_per_image']} | {v['images_per_s']} | {v['achieved_gflops']} |")
    lines += ["", f"The slow machine ({r['slow_machine']['cpu']}): {r['slow_machine']['images_per_s']:.0f} img/s on the "
              f"reference step ({r['slow_machine']['measured']}) = **{e['slow_gflops']:.1f} GFLOP/s**.", "",
              f"- FLOPs only (the same efficiency as the reference): the default at {e['flops_only_img_s']:.0f} img/s "
              f"there, {r['flops_only_epochs_within']} epochs in {r['minutes']:g} min.",
              f"- Scaled by the default's efficiency relative to the reference measured here "
              f"(**{e['efficiency_ratio']:.2f}x**): **{e['img_s']:.0f} img/s** there, "
              f"**{r['epochs_within']} epochs** of {r['train_images']:,} images in {r['minutes']:g} min.",
              f"- params.yaml's `train.epochs: {r['configured_epochs']}` would take "
              f"**{r['configured_minutes_there']:.1f} min** of training there."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
