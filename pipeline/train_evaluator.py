"""train_evaluator: processed splits -> the metrics' feature network (a small CNN: a classifier on
labelled data, self-supervised on unlabelled data; ``evaluate.features``).

    python -m pipeline.train_evaluator --processed data/processed \
        --model models/evaluator.pt --metrics reports/evaluator/metrics.json

It depends only on the processed data, its own params and ``evaluate.features``, so DVC keeps it
cached while generators come and go.
"""

from __future__ import annotations

from typing import Any

import torch

from aigc.config import EvaluateConfig, EvaluatorConfig, RuntimeConfig
from aigc.data.preprocess import load_info, load_split
from aigc.io import atomic_path, write_json
from aigc.metrics.evaluator import evaluator_net, evaluator_payload, objective_for, train_evaluator
from pipeline._stage import main


def run_train_evaluator(seed: int, evaluator: EvaluatorConfig, processed: str, model: str, metrics: str,
                        evaluate: EvaluateConfig = EvaluateConfig(),
                        runtime: RuntimeConfig = RuntimeConfig()) -> dict[str, Any]:
    """Train the feature network on PROCESSED's train split (as ``evaluate.features`` says); check it on the test split."""
    info = load_info(processed)
    train, test = load_split(processed, "train"), load_split(processed, "test")
    objective, why = objective_for(evaluate.features, info)
    print(f"evaluator: {why}")
    result = train_evaluator(evaluator, evaluator_net(evaluator, info, objective), train, test, seed,
                             device=runtime.device)
    with atomic_path(model) as tmp:
        torch.save(evaluator_payload(result.model), tmp)
    epochs = evaluator.epochs if objective == "classifier" else evaluator.contrastive.epochs
    summary = result.summary() | {"epochs": epochs, "test_images": len(test["labels"])}
    write_json(metrics, summary)
    print(result.describe(len(test["labels"])))
    return summary


if __name__ == "__main__":
    main(run_train_evaluator, name="train_evaluator", sections=("seed", "evaluator", "evaluate", "runtime"),
         paths=("processed", "model", "metrics"))
