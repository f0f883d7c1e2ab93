"""The model families at equal training time: FID gap, label accuracy, bits/dim and speed of each.

    python -m aigc_bench.families [--budget 240] [--families dcgan,cdcgan,vae,cpixelcnn] [--threads 1]

Builds the default data in memory (params.yaml's data section: 5,000 MNIST digits), trains the
evaluator once with params.yaml's evaluator section, then trains each family as the train stage
does (its recipe from params.yaml's model/train/vae/pixelcnn sections, the one loop) for
``--budget`` seconds of training (whole epochs: the run stops at the first epoch end past the
budget). A snapshot of the networks is kept at every epoch end and scored afterwards, so scoring
never counts as training time: FID and its floor on ``--samples`` generated images, for
conditional families the label accuracy beside its floor (the evaluator's test accuracy), for the
families with a likelihood the test split's bits/dim (pixelcnn: exact; vae: the k=64 IWAE bound,
under its own Bernoulli likelihood: not the same scale), and the samples/s of drawing them.
Families: dcgan, cdcgan (conditional dcgan), mlp, vae, cvae, pixelcnn, cpixelcnn (conditional).
Writes reports/benchmarks/families.{json,md,png} and one sample grid per family
(families_<family>.png; ``--out`` renames them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from aigc import machine

import torch

from aigc.config import load_params
from aigc.data.preprocess import preprocess
from aigc.data.sources import load_source
from aigc.images import make_grid, save_png
from aigc.metrics import calc_metrics, embed, reference
from aigc.metrics.evaluator import evaluator_net, fit_evaluator, label_indices
from aigc.metrics.labels import label_accuracy
from aigc.models import build_generator, draw
from aigc.training import EpochEnd, Hooks, recipe_for, split_data, train

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "benchmarks"
FAMILIES = {"dcgan": ("dcgan", False), "cdcgan": ("dcgan", True), "mlp": ("mlp", False), "vae": ("vae", False),
            "cvae": ("vae", True), "pixelcnn": ("pixelcnn", False), "cpixelcnn": ("pixelcnn", True)}


def evaluator_setup(params: Any) -> tuple[Any, torch.Tensor, torch.Tensor, Any, Any]:
    """The default data preprocessed as the pipeline does, and the evaluator classifier trained on it
    as the train_evaluator stage does: (processed, train images, test images, its config, the model)."""
    data = preprocess(load_source(params.data), params.data, params.seed)
    train_x, test_x = torch.from_numpy(data.train["images"]), torch.from_numpy(data.test["images"])
    enet = evaluator_net(params.evaluator, data.info)
    ev = fit_evaluator(params.evaluator, enet, train_x, label_indices(data.train["labels"], enet), test_x,
                       label_indices(data.test["labels"], enet), params.seed, progress=False).model
    return data, train_x, test_x, enet, ev


class BudgetSpent(Exception):
    """Raised by the epoch hook to end a run once its training seconds pass the budget."""


def markdown(report: dict[str, Any]) -> str:
    """The table: each family at its last epoch within the budget (the curves are in the JSON)."""
    mc = report["machine"]
    lines = [f"# Families at equal training time (`{report.get('command', 'python -m aigc_bench.families')}`)", "",
             f"CPU: {mc['cpu_model']} ({mc['isa']}), {report['threads']} thread(s); load average "
             f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after; "
             f"~{report['budget_s']:.0f} s of training per family (whole epochs); FID on {report['samples_per_score']} "
             "samples, gap = FID - floor; bits/dim on the test split (pixelcnn exact; vae: IWAE k=64 bound under its "
             "Bernoulli likelihood, another scale; GANs: none).", "",
             "| family | epochs | train s | img/s | samples/s | FID gap | label accuracy / floor | test bits/dim |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, fam in report["families"].items():
        if not fam["curve"]:
            continue
        r = fam["curve"][-1]
        label = (f"{r['label_accuracy']:.3f} / {r['label_accuracy_floor']:.3f}" if "label_accuracy" in r else "-")
        bpd = "-" if r.get("test_bits_per_dim") is None else f"{r['test_bits_per_dim']:.3f}"
        lines.append(f"| {name} | {r['epoch']} | {r['train_seconds']:.0f} | {r['images_per_s']:.0f} | "
                     f"{r.get('samples_per_s', float('nan')):.0f} | {r['fid_gap']:.2f} | {label} | {bpd} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m aigc_bench.families", description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=240.0, help="training seconds per family (default: %(default)s)")
    ap.add_argument("--families", default="dcgan,cdcgan,vae", help="comma-separated, of " + ", ".join(FAMILIES))
    ap.add_argument("--samples", type=int, default=2000, help="generated images per score (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads, training and scoring (default: %(default)s)")
    ap.add_argument("--out", default="families", help="name of the report files in reports/benchmarks (default: %(default)s)")
    args = ap.parse_args()
    names = args.families.split(",")
    if bad := [f for f in names if f not in FAMILIES]:
        sys.exit(f"error: --families {args.families}: unknown {bad}; choose from {', '.join(FAMILIES)}")
    if args.threads < 1 or args.samples < 2 or args.budget <= 0:
        sys.exit(f"error: --threads {args.threads} --samples {args.samples} --budget {args.budget}: threads must be "
                 "at least 1, samples at least 2, the budget above 0 s")
    params = load_params(ROOT / "params.yaml")
    torch.set_num_threads(args.threads)
    runtime = params.runtime.model_copy(update={"threads": args.threads})
    load0 = os.getloadavg()

    data, train_x, test_x, enet, ev = evaluator_setup(params)
    test_emb = embed(ev, test_x)
    test_idx = label_indices(data.test["labels"], enet)
    ref = reference(ev, embed(ev, train_x), test_emb, data.train["labels"], args.samples, params.evaluate.seed)
    print(f"evaluator ready; {len(train_x)} train / {len(test_x)} test images")

    report = {"budget_s": args.budget, "samples_per_score": args.samples, "sample_size": ref.sample_size,
              "threads": args.threads, "machine": machine.describe(), "cores": os.cpu_count(),
              "load_average_before": load0, "families": {}}
    for name in names:
        family, conditional = FAMILIES[name]
        model = params.model.model_copy(update={"family": family, "conditional": conditional})
        cfg = params.train.model_copy(update={"epochs": 10_000, "sample_every": 1})
        recipe, train_data, _ = recipe_for(model, cfg, params.vae, params.privacy.dp, data.info, data.train,
                                           params.pixelcnn)
        test_data = split_data(data.test, recipe)
        net = recipe.net
        snapshots: list[tuple[int, int, float, dict, dict]] = []

        def snapshot(end: EpochEnd) -> None:
            nets = {k: copy.deepcopy(m.state_dict()) for k, m in recipe.nets.items()}  # for the likelihood
            snapshots.append((end.epoch, end.step, end.seconds, copy.deepcopy(end.G.state_dict()), nets))
            print(f"{name}: epoch {end.epoch} at {end.seconds:.0f} s", flush=True)
            if end.seconds >= args.budget:
                raise BudgetSpent

        load_start = os.getloadavg()
        try:
            train(cfg, recipe, train_data, Hooks(on_epoch=snapshot, progress=False), seed=params.seed, runtime=runtime)
        except BudgetSpent:
            pass
        G = build_generator(net)
        rows = []
        for epoch, step, seconds, state, nets in snapshots:
            G.load_state_dict(state)
            t = time.perf_counter()
            fake, asked = draw(G, net.z_dim, args.samples, params.evaluate.seed, batch_size=params.evaluate.batch_size)
            sampling = args.samples / (time.perf_counter() - t)
            emb = embed(ev, fake)
            scores = calc_metrics(emb, ref, params.evaluate, names=["fid"])
            for k, m in recipe.nets.items():
                m.load_state_dict(nets[k])
            bpd = recipe.likelihood(test_data)["bits_per_dim"]  # None for a GAN
            row = {"epoch": epoch, "train_seconds": round(seconds, 1), "images_per_s": round(step * cfg.batch_size / seconds, 1),
                   "samples_per_s": round(sampling, 1), "test_bits_per_dim": None if bpd is None else round(bpd, 4),
                   "fid": round(scores["fid"], 3), "fid_floor": round(scores["fid_floor"], 3),
                   "fid_gap": round(scores["fid"] - scores["fid_floor"], 3)}
            if asked is not None:
                la = label_accuracy(emb, label_indices(torch.tensor(net.classes)[asked].numpy(), enet), test_emb,
                                    test_idx, list(enet.classes))
                row |= {k: round(la[k], 4) for k in ("label_accuracy", "label_accuracy_floor", "label_accuracy_ratio",
                                                      "label_accuracy_worst_ratio", "label_accuracy_worst_class")}
            rows.append(row)
            print(f"{name}: epoch {epoch:3d} {seconds:6.0f} s  FID {row['fid']:.2f} (floor {row['fid_floor']:.2f})"
                  + (f"  {bpd:.3f} bits/dim" if bpd is not None else "") + f"  {sampling:.0f} samples/s"
                  + (f"  label acc {row['label_accuracy']:.3f} (floor {row['label_accuracy_floor']:.3f}, worst class "
                     f"ratio {row['label_accuracy_worst_ratio']:.2f})" if asked is not None else ""), flush=True)
        save_png(make_grid(draw(G, net.z_dim, 64, 0, labels=(torch.arange(64) * max(net.num_classes, 1) // 64)
                                if net.conditional else None)[0]), OUT / f"{args.out}_{name}.png")
        report["families"][name] = {"model": model.model_dump(), "net": net.to_dict(), "epochs": len(rows),
                                    "load_average_start": load_start, "load_average_end": os.getloadavg(), "curve": rows}
    report["load_average_after"] = os.getloadavg()
    report["command"] = " ".join(["python -m aigc_bench.families", *sys.argv[1:]])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    (OUT / f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, fam in report["families"].items():
        c = fam["curve"]
        ax.plot([r["train_seconds"] for r in c], [max(r["fid_gap"], 1e-3) for r in c], "o-", label=name)
    ax.set(xlabel="training wall-clock (s)", ylabel="FID - floor (evaluator features)", yscale="log",
           title=f"Families at equal training time ({report['machine']['cpu_model'][:40]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / f"{args.out}.png")
    print(f"wrote {OUT / args.out}.json, .md, .png and the {args.out}_<family>.png grids")


if __name__ == "__main__":
    main()
