"""Sampling speed: samples/s of each family's generator, the autoregressive pixelcnn beside the
one-pass families.

    python -m aigc_bench.sampling [--rounds 3] [--threads 1] [--points grey28,rgb32]

A dcgan, a vae or a pixelcnn draws its samples with one network pass per batch, the pixelcnn
with one (cached) pass per sub-pixel (aigc/models/pixelcnn.py), so its speed decides how long
the evaluate stage's ``evaluate.num_samples`` take. Each point is an untrained generator of
params.yaml's model and pixelcnn sections (speed does not depend on the weights) on the default
data's shape, 28x28 grey with 10 classes (the conditional net `model.conditional: auto` builds),
and one RGB 32x32 point for the pixelcnn; timed at the evaluate stage's batch
(``evaluate.batch_size``) and at a sample grid's (64), through ``aigc.models.draw`` as the stages
call it. Variants are interleaved, ``--rounds`` times, and only medians are quoted: the machine is
shared. Writes reports/benchmarks/sampling[_<isa>].{json,md} with the CPU, its flags and the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "benchmarks"
# name -> (family, channels, side); every point conditional on 10 classes, as the default data makes it
POINTS = {"dcgan": ("dcgan", 1, 28), "vae": ("vae", 1, 28), "pixelcnn": ("pixelcnn", 1, 28),
          "pixelcnn_rgb32": ("pixelcnn", 3, 32)}


def generator(family: str, channels: int, side: int, params: Any, classes: int = 10):
    """(an untrained G of params' model/pixelcnn sections for ``channels`` x ``side`` x ``side``
    images, conditional on ``classes`` balanced classes, and its NetConfig)."""
    from aigc.models import build_generator, net_config

    info = {"resolution": [side, side], "channels": channels, "classes": list(range(classes)),
            "counts": {"train_per_class": {str(k): 10 for k in range(classes)}}}
    model = params.model.model_copy(update={"family": family, "conditional": True})
    net = net_config(model, info, pixelcnn=params.pixelcnn)
    return build_generator(net).eval(), net


def samples_per_s(G: Any, z_dim: int, n: int, batch: int, seed: int = 0) -> float:
    """``n`` samples through ``aigc.models.draw`` (the stages' sampler) at ``batch`` per call: samples/s."""
    from aigc.models import draw

    t = time.perf_counter()
    draw(G, z_dim, n, seed, batch_size=batch)
    return n / (time.perf_counter() - t)


def run(points: dict[str, tuple[str, int, int]], batches: list[int], rounds: int, params: Any,
        samples: dict[str, int]) -> dict[str, Any]:
    """Every (point, batch) timed ``rounds`` times, interleaved; ``points``: name -> (family,
    channels, side) (see POINTS); ``samples[name]`` images each time (rounded up to whole batches).
    Returns the medians and every round."""
    nets = {p: generator(*shape, params) for p, shape in points.items()}
    times: dict[str, list[float]] = {f"{p}@{b}": [] for p in points for b in batches}
    for _ in range(rounds):
        for p in points:
            G, net = nets[p]
            for b in batches:
                n = max(b, -(-samples[p] // b) * b)
                times[f"{p}@{b}"].append(samples_per_s(G, net.z_dim, n, b))
    rows = []
    for p in points:
        net = nets[p][1]
        for b in batches:
            rows.append({"point": p, "family": net.family, "shape": [net.channels, net.height, net.width],
                         "net": ({"layers": net.pixel_layers, "width": net.pixel_width} if net.family == "pixelcnn"
                                 else {}), "batch": b, "samples_per_s": round(statistics.median(times[f"{p}@{b}"]), 2),
                         "rounds": [round(x, 2) for x in times[f"{p}@{b}"]]})
    return {"rows": rows}


def markdown(report: dict[str, Any]) -> str:
    from aigc import machine

    mc = report["machine"]
    lines = [f"# Sampling speed (`{report['command']}`)", "",
             f"Machine: {mc['cpu_model']}, {mc['isa']} (flags: {' '.join(mc['vector_flags'])}); torch {mc['torch']}; "
             f"{machine.kernels_line(mc)}; {report['threads']} thread(s); load average {report['load_average_before'][0]:.2f} "
             f"before and {report['load_average_after'][0]:.2f} after; {report['seconds']:.0f} s in all; medians of "
             f"{report['rounds']} interleaved rounds.", "",
             "Untrained generators of params.yaml's model and pixelcnn sections, conditional on 10 classes; "
             "samples/s through `aigc.models.draw`.", "",
             "| point | family | shape (C, H, W) | batch | samples/s | rounds |", "| --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        net = f" ({r['net']['layers']} layers x {r['net']['width']})" if r["net"] else ""
        lines.append(f"| {r['point']} | {r['family']}{net} | {tuple(r['shape'])} | {r['batch']} | {r['samples_per_s']:.1f} "
                     f"| {', '.join(f'{x:.1f}' for x in r['rounds'])} |")
    for r in report["rows"]:
        if r["point"] == "pixelcnn" and r["batch"] == report["evaluate_batch"]:
            lines += ["", f"The evaluate stage's {report['evaluate_samples']:,} samples of the pixelcnn at this speed: "
                          f"~{report['evaluate_samples'] / r['samples_per_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m aigc_bench.sampling", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--points", default=",".join(POINTS), help="comma-separated, of " + ", ".join(POINTS))
    ap.add_argument("--batches", default="64,500", help="batch sizes, comma-separated (default: %(default)s)")
    ap.add_argument("--samples", type=int, default=500,
                    help="images per timing of a pixelcnn point (x10 for the one-pass families; default: %(default)s)")
    ap.add_argument("--out", type=Path, default=OUT, help="report folder (default: reports/benchmarks)")
    args = ap.parse_args()
    points = args.points.split(",")
    if bad := [p for p in points if p not in POINTS]:
        sys.exit(f"error: --points {args.points}: unknown {bad}; choose from {', '.join(POINTS)}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        sys.exit(f"error: --batches {args.batches}: give whole numbers separated by commas")
    if args.rounds < 1 or args.threads < 1 or args.samples < 1 or min(batches) < 1:
        sys.exit(f"error: --rounds {args.rounds} --threads {args.threads} --samples {args.samples} --batches "
                 f"{args.batches}: each must be at least 1")

    import torch

    from aigc import machine
    from aigc.config import load_params

    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    start, load0 = time.time(), os.getloadavg()
    samples = {p: args.samples * (1 if POINTS[p][0] == "pixelcnn" else 10) for p in points}
    report = {"command": " ".join(["python -m aigc_bench.sampling", *sys.argv[1:]]), "machine": machine.describe(),
              "threads": args.threads, "rounds": args.rounds, "load_average_before": load0,
              "samples_per_timing": samples, "evaluate_batch": params.evaluate.batch_size,
              "evaluate_samples": params.evaluate.num_samples}
    report |= run({p: POINTS[p] for p in points}, batches, args.rounds, params, samples)
    report |= {"load_average_after": os.getloadavg(), "seconds": round(time.time() - start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"sampling{machine.report_suffix()}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
