"""One page that tells the story of one training run (``reports/run.html``): the last sample grid,
the loss curves, every score beside its spread and floor, the nearest-neighbour grid, the
registry's decision with its reason and gates, epsilon when the discriminator was trained with
differential privacy, and the lineage (data hash, params hash, commit).

The page is the Jinja2 template ``aigc/templates/run.html.j2``, self-contained (aigc/html.py).
Its inputs are plain files: the workspace's stage outputs (the report stage, pipeline/report.py)
or the same files downloaded from the run's MLflow artifacts (``aigc report RUN_ID``), so the two
give the same page for the same run.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aigc.html import line_chart, png_uri, render
from aigc.promotion import DIRECTIONS

TEMPLATE = "run.html.j2"
# Per-step names drawn as loss curves (GANs: d_loss, g_loss; the VAE: its ELBO terms); the loop's
# other figures (D's outputs, EMA beta, epsilon, ...) go to a second chart.
LOSS_NAMES = ("loss", "recon", "kl", "neg_elbo")
# Where each input sits in a run's MLflow artifacts (the train, evaluate and report stages log them).
ARTIFACTS = {"losses": "reports/losses.csv", "samples": "reports/samples.png", "train_metrics": "reports/metrics.json",
             "metrics": "evaluation/metrics.json", "scores": "evaluation/scores.json",
             "nearest": "evaluation/nearest.png", "registry": "report/registry.json", "run": "report/run.json"}
ARTIFACT_FOLDERS = ("reports", "evaluation", "report")


@dataclass
class RunFiles:
    """The files one page is made of; any may be missing (a stage that has not run, an old run)."""

    run: Path | None = None  # models/run.json: run id, params, lineage, the training's figures
    train_metrics: Path | None = None  # reports/train/metrics.json
    losses: Path | None = None  # reports/train/losses.csv
    samples: Path | None = None  # reports/train/samples.png: the last epoch's grid
    metrics: Path | None = None  # reports/metrics.json: every figure of the evaluation
    scores: Path | None = None  # reports/scores.json: the headline scores, in order
    nearest: Path | None = None  # reports/eval/nearest.png
    registry: Path | None = None  # reports/registry.json
    data_gate: Path | None = None  # reports/data_quality/summary.json
    extra: dict[str, Any] = field(default_factory=dict)  # what MLflow adds: run name, tags, experiment


def _json(path: Path | None) -> dict[str, Any]:
    if path is None or not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _png(path: Path | None) -> str | None:
    return png_uri(Path(path).read_bytes()) if path is not None and Path(path).is_file() else None


def read_losses(path: Path | None) -> tuple[list[float], dict[str, list[float]]]:
    """losses.csv -> (steps, {name: values}); blanks (a name not reported that step) become NaN."""
    if path is None or not Path(path).is_file():
        return [], {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return [], {}
    names = [k for k in rows[0] if k not in ("step", "epoch")]
    steps = [float(r["step"]) for r in rows]
    return steps, {k: [float(r[k]) if r[k] not in ("", None) else math.nan for r in rows] for k in names}


def _charts(path: Path | None) -> list[dict[str, Any]]:
    steps, series = read_losses(path)
    if not series:
        return []
    losses = {k: v for k, v in series.items() if k.endswith("_loss") or k in LOSS_NAMES}
    other = {k: v for k, v in series.items() if k not in losses}
    charts = [{"title": "Losses per step", "svg": line_chart(steps, losses)}] if losses else []
    if other:
        charts.append({"title": "Other figures of the loop per step", "svg": line_chart(steps, other)})
    return charts


def _score_rows(headline: dict[str, Any], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per headline score (reports/scores.json's order): value, spread, floor and its
    spread, ceiling, the gap to the floor, and which way is better; then one row per score the
    feature space cannot give (unlabelled data), saying why in place of a value."""
    every = metrics | headline
    rows = []
    for key in headline:
        if key.endswith(("_se", "_floor")):
            continue
        value, floor = every.get(key), every.get(f"{key}_floor")
        gap = value - floor if isinstance(value, (int, float)) and isinstance(floor, (int, float)) else None
        rows.append({"key": key, "value": value, "se": every.get(f"{key}_se"), "floor": floor,
                     "floor_se": every.get(f"{key}_floor_se"), "ceiling": every.get(f"{key}_ceiling"), "gap": gap,
                     "better": DIRECTIONS.get(key, "—")})
    for key, why in (metrics.get("not_available") or {}).items():
        rows.append({"key": key, "value": why, "se": None, "floor": None, "floor_se": None, "ceiling": None,
                     "gap": None, "better": DIRECTIONS.get(key, "—")})
    return rows


def context(files: RunFiles) -> dict[str, Any]:
    """Everything the template shows, from the files (missing ones leave their section saying so)."""
    run = _json(files.run)
    extra = files.extra
    training = run.get("training") or {}
    train_metrics = _json(files.train_metrics)
    figures = training | train_metrics
    metrics, headline = _json(files.metrics), _json(files.scores)
    if not headline:  # an evaluation from before reports/scores.json: every score that has a floor
        headline = {k: v for k, v in metrics.items() if f"{k}_floor" in metrics and not k.endswith("_floor")}
    registry = _json(files.registry)
    gate = _json(files.data_gate)
    params = run.get("params") or extra.get("params") or {}
    tags = extra.get("tags") or {}
    eval_lineage = metrics.get("lineage") or {}
    lineage = {
        "MLflow run": run.get("run_id") or extra.get("run_id"),
        "tracking store": run.get("tracking_uri") or extra.get("tracking_uri"),
        "git commit": run.get("git_commit") or tags.get("mlflow.source.git.commit"),
        "data (processed splits) sha256": run.get("dataset_sha256") or tags.get("aigc.dataset_sha256"),
        "params sha256": run.get("params_sha256") or tags.get("aigc.params_sha256")
                         or (registry.get("candidate") or {}).get("params_sha256"),
        "generator file sha256": eval_lineage.get("generator_sha256"),
        "evaluator weights sha256": eval_lineage.get("evaluator_weights_sha256"),
        "evaluation settings sha256": eval_lineage.get("settings_sha256"),
    }
    decision = registry.get("decision") or {}
    outcome = registry.get("outcome") or tags.get("aigc.registry_decision")
    family = params.get("model.family", "?")
    # the train stage's tag holds what model.conditional (possibly "auto") resolved to
    conditional = str(tags.get("aigc.conditional") or params.get("model.conditional", "false")).lower() == "true"
    title = extra.get("run_name") or run.get("run_name") or f"{'conditional ' if conditional else ''}{family} run"
    return {
        "title": title,
        "run_id": lineage["MLflow run"],
        "experiment": extra.get("experiment"),
        "outcome": outcome,
        "headline": _headline(figures, headline, registry),
        "samples": _png(files.samples),
        "nearest": _png(files.nearest),
        "records_withheld": bool(metrics.get("records_withheld")),  # encrypted at rest: no record shown
        "charts": _charts(files.losses),
        "training": {k: figures[k] for k in ("images_per_s", "seconds", "epochs", "steps", "threads",
                                             "tracking_seconds") if k in figures},
        "final": {k.removeprefix("final_"): v for k, v in figures.items() if k.startswith("final_")},
        "device": run.get("device"),
        "privacy": {k: figures[k] for k in ("epsilon", "delta") if k in figures},
        "likelihood": {"bits_per_dim": figures.get("test_bits_per_dim"), "how": training.get("likelihood")},
        "scores": _score_rows(headline, metrics),
        "protocol": {k: metrics[k] for k in ("num_samples", "sample_size", "sets", "reference_subsets",
                                             "train_size", "heldout_size", "prdc_k") if k in metrics},
        "registry": registry,
        "gates": decision.get("gates") or {},
        "data_gate": {"passed": gate.get("passed"), **(gate.get("counts") or {})} if gate else {},
        "lineage": lineage,
        "params": {k: params[k] for k in sorted(params)},
    }


def _headline(figures: dict[str, Any], headline: dict[str, Any], registry: dict[str, Any]) -> str:
    parts = []
    if "epochs" in figures:
        parts.append(f"{figures['epochs']} epoch(s)")
    if "images_per_s" in figures:
        parts.append(f"{figures['images_per_s']:,} img/s")
    if isinstance(headline.get("fid"), (int, float)):
        floor = headline.get("fid_floor")
        parts.append(f"FID {headline['fid']:.4g}" + (f" (floor {floor:.3g})" if isinstance(floor, (int, float)) else ""))
    if isinstance(figures.get("test_bits_per_dim"), (int, float)):
        parts.append(f"{figures['test_bits_per_dim']:.3f} bits/dim")
    if "epsilon" in figures:
        parts.append(f"ε = {figures['epsilon']:.3g}")
    if registry.get("outcome"):
        parts.append(f"registry: {registry['outcome']}")
    return " · ".join(parts)


def render_page(files: RunFiles) -> str:
    return render(TEMPLATE, **context(files))


def workspace_files(run: str, train_metrics: str, losses: str, samples: str, metrics: str, scores: str,
                    nearest: str, registry: str, data_gate: str) -> RunFiles:
    return RunFiles(*(Path(p) for p in (run, train_metrics, losses, samples, metrics, scores, nearest, registry,
                                        data_gate)))


def artifact_files(root: Path, extra: dict[str, Any]) -> RunFiles:
    """The files as a run's MLflow artifacts hold them (downloaded under ``root``)."""
    return RunFiles(**{k: root / v for k, v in ARTIFACTS.items()}, extra=extra)
