"""Time to quality: FID gap to the floor against training time for every candidate recipe.

    python -m aigc_bench.time_to_quality --evaluator models/evaluator.pt [--budget 240 --marks 4]

Trains each candidate (today's recipe and the combinations the ``model``/``train`` switches make
possible) on the workspace's processed data, side by side: one process per candidate, one CPU
thread each, all started together. The machine is shared, so no candidate gets a quiet minute
the others do not: the scheduler interleaves them, and each one's clock is its own process's
CPU time (with one thread, the seconds it actually computed). Each stops after ``--budget``
CPU seconds and snapshots its generator (the EMA one when on) at ``--marks`` evenly spaced
times. Afterwards every snapshot is scored with ONE evaluator file (FID and covered classes,
``--samples`` images against the test split), so scoring never counts as training.

Writes reports/benchmarks/time_to_quality.{json,md,png}: per candidate the FID gap at each mark,
img/s, samples/s, the test split's bits/dim for the pixelcnn (exact), the CPU model and the load
average sampled while they trained.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from aigc import machine
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "benchmarks"

LIGHT = {"g_widths": [128, 64], "d_widths": [64, 128], "kernel": 4}
EMA = {"ema_kimg": 10.0, "ema_rampup": 0.05}
# name -> (model overrides, train overrides), on top of params.yaml's model/train sections with
# today's recipe restored (the 2015 DCGAN, non-saturating BCE, batch 64, no EMA/augmentation).
TODAY_MODEL = {"g_widths": [256, 128, 64], "d_widths": [64, 128, 256], "kernel": 5, "d_dropout": 0.3,
               "spectral_norm": False, "conditional": False}
TODAY_TRAIN = {"loss": "bce", "batch_size": 64, "lr_g": 2e-4, "lr_d": 2e-4, "beta1": 0.5, "beta2": 0.999,
               "r1_gamma": 0.0, "gp_weight": 0.0, "ema_kimg": 0.0, "augment": []}
DEFAULT_M, DEFAULT_T = LIGHT | {"spectral_norm": True}, EMA | {"loss": "hinge"}
CANDIDATES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "today (dcgan 5x5, BCE)": ({}, {}),
    "light (4x4, G 128-64, D 64-128) + EMA": (LIGHT, EMA),
    "light + R1 (gamma 0.1) + EMA": (LIGHT, EMA | {"r1_gamma": 0.1}),
    "light + WGAN-GP + EMA": (LIGHT | {"d_dropout": 0.0}, EMA | {"loss": "wgan", "gp_weight": 10.0}),
    "light + hinge + SN + EMA": (DEFAULT_M, DEFAULT_T),
    "light + hinge + SN + EMA, no dropout": (DEFAULT_M | {"d_dropout": 0.0}, DEFAULT_T),
    "light + hinge + SN + EMA + DiffAugment": (DEFAULT_M, DEFAULT_T | {"augment": ["translation", "cutout"]}),
    "conditional: light + hinge + SN + EMA": (DEFAULT_M | {"conditional": True}, DEFAULT_T),
    "conditional: light + hinge + SN + EMA, no dropout": (DEFAULT_M | {"conditional": True, "d_dropout": 0.0},
                                                          DEFAULT_T),
    # issue 26's levers, each one change to the conditional default above (params.yaml's recipe)
    **{f"cond. default{tag}": (DEFAULT_M | {"conditional": True, "d_dropout": 0.0} | m, DEFAULT_T | t) for tag, (m, t) in {
        "": ({}, {}),
        ", batch 128 (lr x sqrt 2)": ({}, {"batch_size": 128, "lr_g": 2.83e-4, "lr_d": 2.83e-4}),
        ", wide (G 256-128, D 128-256)": ({"g_widths": [256, 128], "d_widths": [128, 256]}, {}),
        ", narrow (G 64-32, D 32-64)": ({"g_widths": [64, 32], "d_widths": [32, 64]}, {}),
        ", TTUR (lr_d 4e-4)": ({}, {"lr_d": 4e-4}),
        ", EMA half-life 2.5 kimg": ({}, {"ema_kimg": 2.5}),
        ", DiffAugment translation": ({}, {"augment": ["translation"]}),
        ", 3x3 + nearest upsample": ({"kernel": 3, "upsample": "nearest"}, {}),
    }.items()},
    # the narrow net (the default since issue 26) and the levers left on it
    **{f"narrow{tag}": (DEFAULT_M | {"conditional": True, "d_dropout": 0.0, "g_widths": [64, 32], "d_widths": [32, 64]}
                        | m, DEFAULT_T | t) for tag, (m, t) in {
        " (G 64-32, D 32-64)": ({}, {}),
        ", narrower (G 32-16, D 16-32)": ({"g_widths": [32, 16], "d_widths": [16, 32]}, {}),
        ", TTUR (lr_d 4e-4)": ({}, {"lr_d": 4e-4}),
        ", batch 128 (lr x sqrt 2)": ({}, {"batch_size": 128, "lr_g": 2.83e-4, "lr_d": 2.83e-4}),
    }.items()},
    "vae (bernoulli)": ({"family": "vae"}, {}),
    "pixelcnn (6 x 32)": ({"family": "pixelcnn"}, {}),
    "conditional pixelcnn (6 x 32)": ({"family": "pixelcnn", "conditional": True}, {}),
}


def recipe(params: Any, name: str) -> tuple[Any, Any]:
    """The ModelConfig and TrainConfig of candidate ``name`` (validated like params.yaml)."""
    from aigc.config import parse_params

    model_o, train_o = CANDIDATES[name]
    raw = params.model_dump()
    raw["model"] |= TODAY_MODEL | model_o
    raw["train"] |= TODAY_TRAIN | train_o
    p = parse_params(raw, f"candidate {name!r}")
    return p.model, p.train


def child(args: argparse.Namespace) -> None:
    """Train one candidate for ``--budget`` CPU seconds at one thread; save its snapshots."""
    from aigc.config import load_params
    from aigc.data.preprocess import load_info, load_split
    from aigc.config import RuntimeConfig
    from aigc.training import Hooks, StepWindow, recipe_for, train as train_loop

    params = load_params(ROOT / "params.yaml")
    model, train = recipe(params, args.child)
    # One layout for every candidate (NCHW): the stage's per-machine probe would otherwise run inside
    # each candidate's clock, and the layout's own speed-up is the speed benchmark's business.
    cfg = train.model_copy(update={"epochs": 10_000, "guard_steps": 0})
    # the family's recipe as the train stage builds it (vae: params' vae section; pixelcnn: its own)
    family_recipe, data, _ = recipe_for(model, cfg, params.vae, params.privacy.dp, load_info(args.processed),
                                        load_split(args.processed, "train"), params.pixelcnn)
    net = family_recipe.net
    rt = RuntimeConfig(threads=1, log_every=5, device="cpu", channels_last=False)
    marks = [args.budget * (i + 1) / args.marks for i in range(args.marks)]
    n_train = len(load_split(args.processed, "train")["images"])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    snaps: list[dict[str, Any]] = []
    sep = {"run": 0, "longest": 0, "steps": 0}  # D separating every real from every fake (the guard's signal)

    def on_steps(w: StepWindow) -> None:
        for row in w.rows:
            sep["run"] = sep["run"] + 1 if row.get("d_separated") == 1.0 else 0
            sep["longest"] = max(sep["longest"], sep["run"])
            sep["steps"] += int(row.get("d_separated") == 1.0)
        cpu = time.process_time() - cpu0
        while len(snaps) < len(marks) and cpu >= marks[len(snaps)]:
            snaps.append({"cpu_seconds": round(cpu, 1), "wall_seconds": round(time.perf_counter() - wall0, 1),
                          "step": w.steps[-1], "images_seen": w.steps[-1] * cfg.batch_size,
                          "epochs": round(w.steps[-1] * cfg.batch_size / n_train, 1),
                          "state": copy.deepcopy(w.G.state_dict())})

    # Stop at the last mark, or when the wall-clock cap runs out on a busy machine (the marks
    # reached so far are kept; every candidate gets the same share of the CPU, so they reach the
    # same marks).
    def abort() -> bool:
        return len(snaps) >= len(marks) or time.perf_counter() - wall0 > args.max_wall

    result = train_loop(cfg, family_recipe, data, Hooks(on_steps=on_steps, progress=False, abort=abort),
                        seed=params.seed, runtime=rt)
    cpu = time.process_time() - cpu0
    torch.save({"name": args.child, "net": net.to_dict(), "ema": net.family in ("dcgan", "mlp") and cfg.ema_kimg > 0,
                "snapshots": snaps,
                "steps": result.steps, "cpu_seconds": cpu, "wall_seconds": time.perf_counter() - wall0,
                "images_per_cpu_s": result.steps * cfg.batch_size / cpu, "last": result.last,
                "d_separated_longest_run": sep["longest"], "d_separated_share": sep["steps"] / max(result.steps, 1)},
               args.out)


def score(runs: list[dict[str, Any]], args: argparse.Namespace, seed: int) -> None:
    """FID gap and covered classes of every snapshot, with one evaluator file."""
    from aigc.config import EvaluateConfig
    from aigc.data.preprocess import load_split
    from aigc.ema import recompute_batchnorm
    from aigc.metrics import calc_metrics, embed, reference
    from aigc.metrics.evaluator import label_indices, load_evaluator
    from aigc.metrics.labels import generated_label_accuracy
    from aigc.models import NetConfig, build_generator, draw
    from aigc.training.likelihood import bits_per_dim

    ev = load_evaluator(args.evaluator)
    train, test = load_split(args.processed, "train"), load_split(args.processed, "test")
    cfg = EvaluateConfig()
    test_emb = embed(ev, test["images"])
    ref = reference(ev, embed(ev, train["images"]), test_emb, train["labels"], args.samples, cfg.seed)
    test_labels = label_indices(test["labels"], ev.cfg)
    for run in runs:
        net = NetConfig(**run["net"])
        G = build_generator(net)
        for snap in run["snapshots"]:
            G.load_state_dict(snap.pop("state"))
            if run["ema"]:
                recompute_batchnorm(G, net.z_dim, "cpu", seed=seed)
            t = time.perf_counter()
            fake, requested = draw(G, net.z_dim, args.samples, cfg.seed, batch_size=cfg.batch_size)
            snap["samples_per_s"] = round(args.samples / (time.perf_counter() - t), 1)
            emb = embed(ev, fake)
            s = calc_metrics(emb, ref, cfg, names=["fid", "modes"])
            snap |= {"fid": round(s["fid"], 3), "fid_floor": round(s["fid_floor"], 3),
                     "fid_gap": round(s["fid"] - s["fid_floor"], 3), "modes": s["modes"],
                     "classes": len(ref.class_share)}
            if net.family == "pixelcnn":  # its exact likelihood of the test split
                snap["test_bits_per_dim"] = round(bits_per_dim(
                    G, torch.from_numpy(test["images"]),
                    net.class_indices(test["labels"]) if net.conditional else None), 4)
            if requested is not None:  # a conditional G: does it draw the class it is asked for?
                la = generated_label_accuracy(emb, requested, net.classes, ev.cfg, test_emb, test_labels)
                snap |= {"label_accuracy_ratio": round(la["label_accuracy_ratio"], 3),
                         "label_accuracy_worst_ratio": round(la["label_accuracy_worst_ratio"], 3)}
            print(f"{run['name']:40s} {snap['cpu_seconds']:6.0f} s  FID gap {snap['fid_gap']:7.2f}  "
                  f"modes {snap['modes']}  {snap['samples_per_s']:.0f} samples/s"
                  + (f"  {snap['test_bits_per_dim']:.3f} bits/dim" if "test_bits_per_dim" in snap else "")
                  + (f"  label accuracy {snap['label_accuracy_ratio']:.2f}x floor "
                                              f"(worst class {snap['label_accuracy_worst_ratio']:.2f}x)"
                                              if "label_accuracy_ratio" in snap else ""))


def sample_grids(runs: list[dict[str, Any]], seed: int, path: Path, n: int = 64) -> None:
    """One 8x8 sample grid per candidate, from its last scored snapshot, side by side."""
    from aigc.ema import recompute_batchnorm
    from aigc.images import make_grid, save_png
    from aigc.models import NetConfig, build_generator, sample

    import numpy as np

    grids = []
    for run in runs:
        net = NetConfig(**run["net"])
        G = build_generator(net)
        G.load_state_dict(run["last_state"])
        if run["ema"]:
            recompute_batchnorm(G, net.z_dim, "cpu", seed=seed)
        grids.append(make_grid(sample(G, net.z_dim, n, seed=0,
                                      labels=net.grid_labels(n) if net.conditional else None)))
    gap = np.full((grids[0].shape[0], 8, grids[0].shape[2]), 255, np.uint8)
    save_png(np.concatenate([x for g in grids for x in (g, gap)][:-1], axis=1), path)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for run in report["candidates"]:
        xs = [s["cpu_seconds"] for s in run["snapshots"]]
        ax.plot(xs, [s["fid_gap"] for s in run["snapshots"]], "o-", label=f"{run['name']} ({run['images_per_cpu_s']:.0f} img/s)")
    ax.set(xlabel="training time: CPU seconds of one thread (candidates side by side)", ylabel="FID - FID floor",
           yscale="log", title=f"Time to quality, {report['machine']['cpu_model']} ({report['machine']['isa']})\nload average {report['load_average']['min']:.1f}"
                               f"-{report['load_average']['max']:.1f} while training")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def markdown(report: dict[str, Any]) -> str:
    marks = [s["cpu_seconds"] for s in report["candidates"][0]["snapshots"]]
    head = " | ".join(f"gap @ ~{m:.0f} s" for m in marks)
    lines = [f"# Time to quality (`{report.get('command', 'python -m aigc_bench.time_to_quality')}`)", "",
             f"CPU: {report['machine']['cpu_model']} ({report['machine']['isa']}), {report['cores']} cores; candidates side by side at 1 thread each; "
             f"load average {report['load_average']['min']:.1f}-{report['load_average']['max']:.1f} "
             f"(mean {report['load_average']['mean']:.1f}) while training; {report['wall_seconds']:.0f} s wall in all. "
             f"FID on the evaluator `{report['evaluator']}` ({report['samples']} samples vs the test split); "
             "gap = FID - floor; modes = classes covered of 10; samples/s of drawing them (1 thread, batch 500); "
             "bits/dim: the test split's exact -log2 p(x) per sub-pixel (pixelcnn only).", "",
             f"| candidate | img/s (1 thread) | {head} | modes at the end | label accuracy / floor (worst class) "
             "| samples/s | test bits/dim |",
             "| --- | --- | " + " | ".join("---" for _ in marks) + " | --- | --- | --- | --- |"]
    for run in report["candidates"]:
        gaps = " | ".join(f"{s['fid_gap']:.2f}" + (f" ({s['epochs']:.0f} ep.)" if "epochs" in s else "")
                          for s in run["snapshots"])
        last = run["snapshots"][-1] if run["snapshots"] else {}
        label = (f"{last['label_accuracy_ratio']:.2f} ({last['label_accuracy_worst_ratio']:.2f})"
                 if "label_accuracy_ratio" in last else "-")
        bpd = f"{last['test_bits_per_dim']:.3f}" if "test_bits_per_dim" in last else "-"
        lines.append(f"| {run['name']} | {run['images_per_cpu_s']:.0f} | {gaps} | {last.get('modes', '-')} | {label} "
                     f"| {last.get('samples_per_s', float('nan')):.0f} | {bpd} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m aigc_bench.time_to_quality", description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=300, help="CPU seconds of training per candidate (default: %(default)s)")
    ap.add_argument("--marks", type=int, default=4, help="scored snapshots per candidate (default: %(default)s)")
    ap.add_argument("--samples", type=int, default=2000, help="generated images per score (default: %(default)s)")
    ap.add_argument("--max-wall", type=float, default=1500,
                    help="wall-clock cap per candidate in seconds; marks not reached by then are dropped (default: %(default)s)")
    ap.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    ap.add_argument("--processed", default=str(ROOT / "data" / "processed"))
    ap.add_argument("--evaluator", default=str(ROOT / "models" / "evaluator.pt"),
                    help="the ONE evaluator file every candidate is scored with")
    ap.add_argument("--runs", default=str(ROOT / "aigc_bench" / ".work" / "time_to_quality"),
                    help="where each candidate's snapshots are kept (default: %(default)s)")
    ap.add_argument("--score-only", action="store_true", help="score the snapshots already in --runs, train nothing")
    ap.add_argument("--report", default="time_to_quality",
                    help="file stem of the report in reports/benchmarks/ (default: %(default)s)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from aigc.config import load_params
    from aigc.errors import UserError
    from aigc.metrics.evaluator import load_evaluator

    params = load_params(ROOT / "params.yaml")
    if not (Path(args.processed) / "train.npz").exists():
        sys.exit(f"error: {args.processed}/train.npz not found (run `dvc repro train_evaluator` first: this "
                 "benchmark uses its data and evaluator)")
    names = args.only or list(CANDIDATES)
    tmp = Path(args.runs)
    tmp.mkdir(parents=True, exist_ok=True)
    meta_path = tmp / "meta.json"
    if args.score_only:
        meta = json.loads(meta_path.read_text())
        names, wall, loads = meta["names"], meta["wall_seconds"], meta["loads"]
    else:
        t0, loads = time.perf_counter(), [os.getloadavg()[0]]
        env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-m", "aigc_bench.time_to_quality", "--child", name,
                                   "--out", str(tmp / f"{i}.pt"), "--budget", str(args.budget), "--marks",
                                   str(args.marks), "--processed", args.processed, "--max-wall", str(args.max_wall)],
                                  cwd=ROOT, env=env)
                 for i, name in enumerate(names)]
        while any(p.poll() is None for p in procs):
            time.sleep(10)
            loads.append(os.getloadavg()[0])
        wall = time.perf_counter() - t0
        if any(p.returncode for p in procs):
            sys.exit(f"error: a candidate failed (exit codes {[p.returncode for p in procs]})")
        meta_path.write_text(json.dumps({"names": names, "wall_seconds": wall, "loads": loads}))
    try:  # the evaluator is needed only now: it may still be training while the candidates do
        load_evaluator(args.evaluator)
    except UserError as exc:
        sys.exit(f"error: {exc}; the trained candidates are kept in {tmp}: rerun with --score-only")
    runs = [torch.load(tmp / f"{i}.pt", weights_only=True) for i in range(len(names))]  # tensors, numbers, str
    common = min(len(r["snapshots"]) for r in runs)  # compare only the marks every candidate reached
    for r in runs:
        r["snapshots"] = r["snapshots"][:common]
        r["last_state"] = r["snapshots"][-1]["state"]
    score(runs, args, params.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    sample_grids(runs, params.seed, OUT / f"{args.report}_samples.png")
    report = {
        "machine": machine.describe(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
        "evaluator": str(Path(args.evaluator).resolve().relative_to(ROOT)) if Path(args.evaluator).resolve().is_relative_to(ROOT)
        else args.evaluator,
        "samples": args.samples, "budget_cpu_seconds": args.budget, "wall_seconds": round(wall, 1),
        "load_average": {"min": min(loads), "max": max(loads), "mean": round(sum(loads) / len(loads), 2),
                         "samples_every_10s": [round(x, 2) for x in loads]},
        "candidates": [{"name": r["name"], "model": {**TODAY_MODEL, **CANDIDATES[r["name"]][0]},
                        "train": {**TODAY_TRAIN, **CANDIDATES[r["name"]][1]},
                        "images_per_cpu_s": round(r["images_per_cpu_s"], 1), "steps": r["steps"],
                        "cpu_seconds": round(r["cpu_seconds"], 1), "wall_seconds": round(r["wall_seconds"], 1),
                        "last_window": {k: round(v, 4) for k, v in r["last"].items()},
                        "d_separated_longest_run": r["d_separated_longest_run"],
                        "d_separated_share": round(r["d_separated_share"], 3),
                        "snapshots": r["snapshots"]} for r in runs],
        "command": " ".join(["python -m aigc_bench.time_to_quality", *sys.argv[1:]]),
        "samples_png": f"{args.report}_samples.png: 64 samples of each candidate at its last mark, left to right "
                       "in the order above (seed 0)",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.report}.json").write_text(json.dumps(report, indent=2) + "\n")
    (OUT / f"{args.report}.md").write_text(markdown(report))
    plot(report, OUT / f"{args.report}.png")
    print(markdown(report))
    print(f"wrote {OUT}/{args.report}.{{json,md,png}}")


if __name__ == "__main__":
    main()
