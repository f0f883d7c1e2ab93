"""register: the evaluated generator -> a new version in the MLflow model registry; the champion
alias moves to it only if it is better (aigc/promotion.py decides, reports/registry.json says why).

    python -m pipeline.register --generator models/generator.pt --evaluator models/evaluator.pt \
        --processed data/processed --cache-dir .cache/eval --run models/run.json \
        --metrics reports/metrics.json --data-gate reports/data_quality/summary.json \
        --registry reports/registry.json

The champion is re-scored in the candidate's feature space and the alias moves by compare-and-set
(``aigc/registration.py``). DVC reruns this stage only when one of its inputs changes, so the
decision is made once per new model.
"""

from __future__ import annotations

import time
from typing import Any

from aigc.config import EvaluateConfig, RegisterConfig, RuntimeConfig, TrackingConfig
from aigc.io import write_json
from aigc.models import NetConfig
from aigc.registration import register_generator
from aigc.tracking import Run
from pipeline._stage import main, read_stage_json


def log_generator(tracker: Run, artifacts: dict[str, str], net: NetConfig) -> str:
    """The generator as an MLflow pyfunc model (pipeline/serving.py) in the training's run; its URI."""
    from pipeline import serving  # only when a version is registered

    return tracker.log_pyfunc_model("generator", serving.CODE_PATH, artifacts, serving.signature(net),
                                    serving.input_example(), serving.pip_requirements())


def run_register(cfg: RegisterConfig, evaluate: EvaluateConfig, tracking: TrackingConfig, generator: str,
                 evaluator: str, processed: str, cache_dir: str, run: str, metrics: str, data_gate: str,
                 registry: str, runtime: RuntimeConfig = RuntimeConfig()) -> dict[str, Any]:
    """Register GENERATOR as a new version of register.model_name; move register.alias to it only if it
    passes the gates and beats the current champion, re-scored with EVALUATOR on PROCESSED, on
    register.metric by a margin its spread justifies. REGISTRY records the decision."""
    t_start = time.perf_counter()
    run_info = read_stage_json(run, "run file", "train")
    scores = read_stage_json(metrics, "metrics file", "evaluate")
    gate = read_stage_json(data_gate, "data-quality summary", "validate")
    done = register_generator(cfg, evaluate, tracking, run_info, scores, gate, generator=generator,
                              evaluator=evaluator, processed=processed, cache_dir=cache_dir, metrics=metrics,
                              registry=registry, log_model=log_generator, started=t_start,
                              device=runtime.device)
    write_json(registry, done.record)
    print(done.message)
    return done.record


if __name__ == "__main__":
    main(run_register, name="register", sections={"cfg": "register", "evaluate": "evaluate", "tracking": "tracking",
                                                  "runtime": "runtime"},
         paths=("generator", "evaluator", "processed", "cache_dir", "run", "metrics", "data_gate", "registry"))
