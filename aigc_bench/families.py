"""The model families at equal training time: FID gap, label accuracy and speed of each.

    python -m aigc_bench.families [--budget 240] [--families dcgan,cdcgan,vae]

Builds the default data in memory (params.yaml's data section: 5,000 MNIST digits), trains the
evaluator once with params.yaml's evaluator section, then trains each family with params.yaml's
model/train/vae sections for ``--budget`` seconds of training (whole epochs: the run stops at the
first epoch end past the budget). A snapshot of the generator is kept at every epoch end and
scored afterwards, so scoring never counts as training time: FID and its floor on ``--samples``
generated images and, for conditional families, the label accuracy beside its floor (the
evaluator's test accuracy). Families: dcgan, cdcgan (conditional dcgan), mlp, vae, cvae.
Writes reports/benchmarks/families.{json,png} and one sample grid per family
(families_<family>.png; ``--out`` renames them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
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
from aigc.models import build_generator, draw, net_config
from aigc.training import EpochEnd, train_gan, train_vae

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "aigc_bench"
FAMILIES = {"dcgan": ("dcgan", False), "cdcgan": ("dcgan", True), "mlp": ("mlp", False), "vae": ("vae", False),
            "cvae": ("vae", True)}


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


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m aigc_bench.families", description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=240.0, help="training seconds per family (default: %(default)s)")
    ap.add_argument("--families", default="dcgan,cdcgan,vae", help="comma-separated, of " + ", ".join(FAMILIES))
    ap.add_argument("--samples", type=int, default=2000, help="generated images per score (default: %(default)s)")
    ap.add_argument("--out", default="families", help="name of the report files in reports/benchmarks (default: %(default)s)")
    args = ap.parse_args()
    names = args.families.split(",")
    if bad := [f for f in names if f not in FAMILIES]:
        sys.exit(f"error: unknown families {bad}; choose from {list(FAMILIES)}")
    params = load_params(ROOT / "params.yaml")
    load0 = os.getloadavg()

    data, train_x, test_x, enet, ev = evaluator_setup(params)
    test_emb = embed(ev, test_x)
    test_idx = label_indices(data.test["labels"], enet)
    ref = reference(ev, embed(ev, train_x), test_emb, data.train["labels"], args.samples, params.evaluate.seed)
    print(f"evaluator ready; {len(train_x)} train / {len(test_x)} test images")

    report = {"budget_s": args.budget, "samples_per_score": args.samples, "sample_size": ref.sample_size,
              "machine": machine.describe(), "cores": os.cpu_count(), "load_average_before": load0, "families": {}}
    for name in names:
        family, conditional = FAMILIES[name]
        model = params.model.model_copy(update={"family": family, "conditional": conditional})
        net = net_config(model, data.info)
        labels = net.class_indices(data.train["labels"]) if net.conditional else None
        cfg = params.train.model_copy(update={"epochs": 10_000, "sample_every": 1})
        snapshots: list[tuple[int, int, float, dict]] = []

        def snapshot(end: EpochEnd) -> None:
            snapshots.append((end.epoch, end.step, end.seconds, copy.deepcopy(end.G.state_dict())))
            print(f"{name}: epoch {end.epoch} at {end.seconds:.0f} s", flush=True)
            if end.seconds >= args.budget:
                raise BudgetSpent

        load_start = os.getloadavg()
        try:
            if family == "vae":
                train_vae(cfg, params.vae, net, train_x, params.seed, on_epoch=snapshot, labels=labels, progress=False)
            else:
                train_gan(cfg, net, train_x, params.seed, on_epoch=snapshot, labels=labels, progress=False)
        except BudgetSpent:
            pass
        G = build_generator(net)
        rows = []
        for epoch, step, seconds, state in snapshots:
            G.load_state_dict(state)
            fake, asked = draw(G, net.z_dim, args.samples, params.evaluate.seed)
            emb = embed(ev, fake)
            scores = calc_metrics(emb, ref, params.evaluate, names=["fid"])
            row = {"epoch": epoch, "train_seconds": round(seconds, 1), "images_per_s": round(step * cfg.batch_size / seconds, 1),
                   "fid": round(scores["fid"], 3), "fid_floor": round(scores["fid_floor"], 3),
                   "fid_gap": round(scores["fid"] - scores["fid_floor"], 3)}
            if asked is not None:
                la = label_accuracy(emb, label_indices(torch.tensor(net.classes)[asked].numpy(), enet), test_emb,
                                    test_idx, list(enet.classes))
                row |= {k: round(la[k], 4) for k in ("label_accuracy", "label_accuracy_floor", "label_accuracy_ratio",
                                                      "label_accuracy_worst_ratio", "label_accuracy_worst_class")}
            rows.append(row)
            print(f"{name}: epoch {epoch:3d} {seconds:6.0f} s  FID {row['fid']:.2f} (floor {row['fid_floor']:.2f})"
                  + (f"  label acc {row['label_accuracy']:.3f} (floor {row['label_accuracy_floor']:.3f}, worst class "
                     f"ratio {row['label_accuracy_worst_ratio']:.2f})" if asked is not None else ""), flush=True)
        save_png(make_grid(draw(G, net.z_dim, 64, 0, labels=(torch.arange(64) * max(net.num_classes, 1) // 64)
                                if net.conditional else None)[0]), OUT / f"{args.out}_{name}.png")
        report["families"][name] = {"model": model.model_dump(), "epochs": len(rows), "load_average_start": load_start,
                                    "load_average_end": os.getloadavg(), "curve": rows}
    report["load_average_after"] = os.getloadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")

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
    print(f"wrote {OUT / args.out}.json, {args.out}.png and the {args.out}_<family>.png grids")


if __name__ == "__main__":
    main()
