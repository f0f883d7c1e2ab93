"""Label accuracy of a conditional generator: does it make the class it is asked for?

The evaluator classifier (aigc/metrics/evaluator.py) judges each generated image; the score is its
agreement with the requested class, overall and per class. Its **floor** is the evaluator's own
test accuracy (overall and per class): a perfect conditional generator -- one that draws real
images of the requested class -- would agree exactly as often as the evaluator is right on real
test images, so the score is read as a ratio to the floor (1 = as good as real data).

This is not in the registry of (fake, reference) metrics: it needs the labels the images were
asked for, which only a conditional generator has. The evaluate stage calls it beside them.
"""

from __future__ import annotations

import numpy as np
import torch

from aigc.metrics.base import Embedding


def label_accuracy(fake: Embedding, requested: torch.Tensor, test: Embedding, test_labels: torch.Tensor,
                   classes: list[int]) -> dict[str, float]:
    """Scores by name: ``label_accuracy`` (share of generated images the evaluator puts in the requested
    class) and its ``label_accuracy_floor`` (the evaluator's test accuracy); per class ``label_accuracy_<k>``
    and ``label_accuracy_<k>_floor`` for each label value k that was requested; ``label_accuracy_ratio``
    (score / floor) and ``label_accuracy_worst_ratio`` with ``label_accuracy_worst_class`` (the class
    with the lowest score / floor). ``requested`` and ``test_labels`` are class indices (N,)."""
    if len(requested) != len(fake):
        raise ValueError(f"{len(requested)} requested labels for {len(fake)} generated images")
    hit = (fake.predicted == requested).double()
    right = (test.predicted == test_labels).double()
    out = {"label_accuracy": float(hit.mean()), "label_accuracy_floor": float(right.mean())}
    ratios = {}
    for i, k in enumerate(classes):
        asked, real = requested == i, test_labels == i
        if not asked.any() or not real.any():
            continue  # never requested (or no test image of it): nothing to measure
        acc, floor = float(hit[asked].mean()), float(right[real].mean())
        out[f"label_accuracy_{k}"], out[f"label_accuracy_{k}_floor"] = acc, floor
        ratios[k] = acc / floor if floor > 0 else float("nan")
    out["label_accuracy_ratio"] = out["label_accuracy"] / out["label_accuracy_floor"] if out["label_accuracy_floor"] \
        else float("nan")
    if ratios:
        worst = min(ratios, key=lambda k: (np.nan_to_num(ratios[k], nan=np.inf), k))
        out["label_accuracy_worst_ratio"], out["label_accuracy_worst_class"] = ratios[worst], float(worst)
    return out


def generated_label_accuracy(fake: Embedding, requested: torch.Tensor, generator_classes: tuple[int, ...],
                             evaluator_cfg, test: Embedding, test_labels: torch.Tensor) -> dict[str, float]:
    """:func:`label_accuracy` of a conditional generator's draw: ``requested`` are the generator's
    class indices (its ``classes`` name their label values), mapped to the evaluator's own indices."""
    from aigc.metrics.evaluator import label_indices

    asked = label_indices(torch.tensor(generator_classes)[requested].numpy(), evaluator_cfg)
    return label_accuracy(fake, asked, test, test_labels, list(evaluator_cfg.classes))


def per_class_floor(test: Embedding, test_labels: torch.Tensor, classes: list[int]) -> dict[str, float]:
    """The evaluator's test accuracy per class (``label_accuracy_<k>_floor``) and overall: the figure of an
    unconditional generator, which has no requested labels to score."""
    right = (test.predicted == test_labels).double()
    out = {"label_accuracy_floor": float(right.mean())}
    for i, k in enumerate(classes):
        if (test_labels == i).any():
            out[f"label_accuracy_{k}_floor"] = float(right[test_labels == i].mean())
    return out


def label_bars(classes: list[int], scores: dict[str, float], title: str) -> np.ndarray:
    """Per-class bars of ``label_accuracy_<k>`` beside ``label_accuracy_<k>_floor`` (and the 0.8 x floor
    mark), as an RGB uint8 picture; classes without a score show the floor only."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt
    from PIL import Image

    x = np.arange(len(classes))
    floor = np.array([scores.get(f"label_accuracy_{k}_floor", np.nan) for k in classes])
    acc = np.array([scores.get(f"label_accuracy_{k}", np.nan) for k in classes])
    w = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(classes) + 2), 3.2), dpi=100)
    ax.bar(x - w / 2, floor, w, label="floor: evaluator's accuracy on real test images", color="#4c72b0")
    if np.isfinite(acc).any():
        ax.bar(x + w / 2, acc, w, label="generated: evaluator agrees with the requested class", color="#dd8452")
        ax.scatter(x + w / 2, 0.8 * floor, marker="_", s=200, color="black", label="0.8 x floor", zorder=3)
    ax.set_xticks(x, [str(c) for c in classes])
    ax.set_ylim(0, 1.3)  # room above the bars for the legend
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.legend(fontsize=7, frameon=False, loc="upper center", ncol=3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))
