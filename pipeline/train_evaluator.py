"""train_evaluator: processed splits -> the metrics' feature network (a small CNN classifier).

    python -m pipeline.train_evaluator --processed data/processed \
        --model models/evaluator.pt --metrics reports/evaluator/metrics.json

It depends only on the processed data and its own params, so DVC keeps it cached while
generators come and go.
"""

from __future__ import annotations

from typing import Any

import torch

from aigc.config import EvaluatorConfig, RuntimeConfig
from aigc.data.preprocess import load_info, load_split
from aigc.io import atomic_path, write_json
from aigc.metrics.evaluator import evaluator_net, evaluator_payload, fit_evaluator, label_indices
from pipeline._stage import main


def run_train_evaluator(seed: int, evaluator: EvaluatorConfig, processed: str, model: str, metrics: str,
                        runtime: RuntimeConfig = RuntimeConfig()) -> dict[str, Any]:
    """Train the evaluator (a classifier) on PROCESSED's train split; report its test accuracy."""
    info = load_info(processed)
    train, test = load_split(processed, "train"), load_split(processed, "test")
    net = evaluator_net(evaluator, info)
    result = fit_evaluator(evaluator, net, torch.from_numpy(train["images"]), label_indices(train["labels"], net),
                           torch.from_numpy(test["images"]), label_indices(test["labels"], net), seed,
                           device=runtime.device)
    with atomic_path(model) as tmp:
        torch.save(evaluator_payload(result.model), tmp)
    summary = {
        "test_accuracy": round(result.test_accuracy, 4),
        "train_accuracy": round(result.train_accuracy, 4),
        "seconds": round(result.seconds, 1),
        "steps": result.steps,
        "epochs": evaluator.epochs,
        "test_images": len(test["labels"]),
    }
    write_json(metrics, summary)
    print(f"evaluator: test accuracy {result.test_accuracy:.4f} on {len(test['labels'])} images "
          f"(train {result.train_accuracy:.4f}); {result.steps} steps in {result.seconds:.1f} s")
    return summary


if __name__ == "__main__":
    main(run_train_evaluator, name="train_evaluator", sections=("seed", "evaluator", "runtime"),
         paths=("processed", "model", "metrics"))
