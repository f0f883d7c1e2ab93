"""register: the evaluated generator -> a new version in the MLflow model registry; the champion
alias moves to it only if it is better (aigc/registry.py decides, reports/registry.json says why).

    python -m pipeline.register --generator models/generator.pt --evaluator models/evaluator.pt \
        --run models/run.json --metrics reports/metrics.json \
        --data-gate reports/data_quality/summary.json --registry reports/registry.json

The version is logged into the training's own MLflow run (run.json) as a pyfunc model
(pipeline/serving.py) and tagged with its metrics, params hash, git commit and dataset hash.
DVC reruns this stage only when one of its inputs changes, so the decision is made once per
new model; a rerun on the same generator file reuses its version instead of registering it twice.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from aigc.config import RegisterConfig, TrackingConfig
from aigc.io import file_sha256, write_json
from aigc.models import load_generator, sample
from aigc.registry import decide, output_problem, params_hash
from aigc.tracking import ModelVersion, Registry, Run
from pipeline._stage import main, read_stage_json

METRIC_TAG = "metric."  # version tags "metric.fid", "metric.fid_floor", ...: the champion's scores
GENERATOR_TAG = "aigc.generator_sha256"


def tag_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The metrics a version was registered with, back from its tags."""
    out = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG):
            try:
                out[key[len(METRIC_TAG):]] = float(value)
            except ValueError:
                pass
    return out


def register(register: RegisterConfig, tracking: TrackingConfig, generator: str, evaluator: str, run: str,
             metrics: str, data_gate: str, registry: str) -> dict[str, Any]:
    """Register GENERATOR as a new version of register.model_name; move register.alias to it only if it
    passes the gates and beats the current champion on register.metric. REGISTRY records the decision."""
    cfg = register
    run_info = read_stage_json(run, "run file", "train")
    scores = read_stage_json(metrics, "metrics file", "evaluate")
    gate = read_stage_json(data_gate, "data-quality summary", "validate")

    # (1) Is the generator broken? NaN or constant output is refused whatever the metrics say.
    G, net = load_generator(generator)
    problem = output_problem(sample(G, net.z_dim, cfg.check_samples, seed=0), cfg.min_output_std)
    candidate = {
        "generator_sha256": file_sha256(generator),
        "evaluator_sha256": file_sha256(evaluator) if Path(evaluator).exists() else None,
        "run_id": run_info.get("run_id"),
        "dataset_sha256": run_info.get("dataset_sha256"),
        "git_commit": run_info.get("git_commit"),
        "params_sha256": params_hash(run_info.get("params", {})),
        # NaN/inf as text: registry.json stays strict JSON
        "metrics": {k: (v if math.isfinite(v) else str(v)) for k, v in scores.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)},
    }
    record: dict[str, Any] = {"model_name": cfg.model_name, "alias": cfg.alias}

    tracker = Run.attach(run_info, tracking)
    if not tracker.active:
        decision = decide(scores, None, cfg, gate.get("passed"), problem)
        record |= {"outcome": "not registered", "promoted": False,
                   "reason": "tracking is off (tracking.enabled: false, or the training recorded no run): "
                             f"nothing registered. The gates alone would have {decision.outcome} it: {decision.reason}",
                   "decision": decision.to_dict(), "candidate": candidate}
        write_json(registry, record)
        print(record["reason"])
        return record

    # (2) The champion now, and whether this very generator file was registered before (a rerun).
    reg = Registry(tracker.uri)
    champion = reg.by_alias(cfg.model_name, cfg.alias)
    champion_metrics = tag_metrics(champion.tags) if champion else None
    decision = decide(scores, champion_metrics, cfg, gate.get("passed"), problem,
                      champion_version=champion.version if champion else None,
                      is_champion=champion is not None and champion.tags.get(GENERATOR_TAG) == candidate["generator_sha256"])

    # (3) The version: logged into the training's run, tagged with everything it was judged on.
    version = reg.find(cfg.model_name, GENERATOR_TAG, candidate["generator_sha256"])
    reused = version is not None
    if version is None:
        version = _log_and_register(tracker, reg, cfg, generator, evaluator, net, candidate, gate.get("passed"))
    reg.set_tags(version, {"aigc.decision": decision.outcome, "aigc.reason": decision.reason[:4000]})
    if decision.promote:
        reg.set_alias(version, cfg.alias)
    tracker.set_tags({"aigc.registered_model": cfg.model_name, "aigc.registered_version": version.version,
                      "aigc.registry_decision": decision.outcome})

    now = reg.by_alias(cfg.model_name, cfg.alias)
    comparable = champion is None or champion.tags.get("aigc.evaluator_sha256") == candidate["evaluator_sha256"]
    record |= {
        "outcome": decision.outcome,
        "promoted": decision.promote,
        "reason": decision.reason,
        "version": version.version,
        "version_uri": version.uri,
        "reused_version": reused,
        "champion_uri": f"models:/{cfg.model_name}@{cfg.alias}",
        "champion_version": now.version if now else None,
        "previous_champion": {"version": champion.version, "metrics": champion_metrics} if champion else None,
        "same_evaluator_as_previous_champion": comparable,
        "decision": decision.to_dict(),
        "candidate": candidate,
        "tracking_uri": tracker.uri,
    }
    if not comparable:
        record["note"] = ("the previous champion was scored with another evaluator (retrained on changed data), "
                          "so raw scores are on different scales; "
                          + ("each score was compared as its gap to its own floor" if cfg.relative_to_floor
                             else "set register.relative_to_floor: true to compare gaps to each one's floor"))
    write_json(registry, record)
    where = f"@{cfg.alias} -> v{now.version}" if now else f"no @{cfg.alias} yet"
    print(f"{cfg.model_name} v{version.version}{' (already registered)' if reused else ''}: {decision.outcome}: "
          f"{decision.reason}; {where}")
    return record


def _log_and_register(tracker: Run, reg: Registry, cfg: RegisterConfig, generator: str, evaluator: str, net: Any,
                      candidate: dict[str, Any], data_gate_passed: Any) -> ModelVersion:
    from pipeline import serving

    with tempfile.TemporaryDirectory(prefix="aigc-register-") as tmp:
        # Stable artifact names inside the model, whatever the files are called in the workspace.
        artifacts = {"generator": str(shutil.copy2(generator, Path(tmp) / "generator.pt"))}
        if candidate["evaluator_sha256"]:
            artifacts["evaluator"] = str(shutil.copy2(evaluator, Path(tmp) / "evaluator.pt"))
        model_uri = tracker.log_pyfunc_model("generator", serving.GeneratorModel(), artifacts,
                                             serving.signature(net), serving.input_example(),
                                             serving.pip_requirements())
    tags = {f"{METRIC_TAG}{k}": v for k, v in candidate["metrics"].items()} | {
        GENERATOR_TAG: candidate["generator_sha256"],
        "aigc.evaluator_sha256": candidate["evaluator_sha256"] or "",
        "aigc.dataset_sha256": candidate["dataset_sha256"] or "",
        "aigc.params_sha256": candidate["params_sha256"],
        "aigc.git_commit": candidate["git_commit"] or "",
        "aigc.data_gate_passed": str(data_gate_passed).lower(),
        "aigc.family": net.family,
    }
    return reg.register(model_uri, cfg.model_name, tags)


if __name__ == "__main__":
    main(register, sections=("register", "tracking"),
         paths=("generator", "evaluator", "run", "metrics", "data_gate", "registry"))
