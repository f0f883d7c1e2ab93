"""Registering a candidate generator: a new version in the MLflow model registry, the champion
alias moved to it only if it is better (``aigc/promotion.py`` decides; the register stage,
``pipeline/register.py``, writes reports/registry.json with why).

One feature space per comparison: the champion's own generator is fetched from the registry and
scored here, in this process, with the candidate's evaluator, data and ``evaluate`` settings
(``aigc/metrics/scorer.py``'s ``Scorer``); the candidate's numbers (reports/metrics.json) are used
only when their lineage (generator, evaluator weights, data and settings hashes) matches these inputs.

The version is logged into the training's own MLflow run (run.json) as a pyfunc model (the stage
says how: ``log_model``, pipeline/serving.py) and tagged with its metrics, params hash, git commit
and dataset hash. A rerun on the same generator file reuses its version instead of registering it
twice.

Parallel register stages (``dvc queue start -j 2``, two teammates) are serialised where it
matters: the alias moves by compare-and-set under the registry's lock
(``Registry.compare_and_set_alias``), so two candidates never both replace the same champion;
the later one is judged again against the new champion.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigc.config import EvaluateConfig, RegisterConfig, TrackingConfig
from aigc.errors import UserError
from aigc.io import file_sha256
from aigc.metrics.scorer import Scorer
from aigc.models import NetConfig, load_generator, sample
from aigc.promotion import decide, output_problem, params_hash
from aigc.tracking import ModelVersion, Registry, Run

METRIC_TAG = "metric."  # version tags "metric.fid", "metric.fid_floor", ...: the champion's scores
GENERATOR_TAG = "aigc.generator_sha256"
MAX_REDECISIONS = 20  # a champion that keeps moving under this stage: give up with a clear line

# (the training's run, the model's artifact files by name, the generator's net) -> the logged model's URI
LogModel = Callable[[Run, dict[str, str], NetConfig], str]


@dataclass(frozen=True)
class Registration:
    """What the register stage writes (``record``: reports/registry.json) and prints (``message``)."""

    record: dict[str, Any]
    message: str


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


def check_lineage(scores: dict[str, Any], expected: dict[str, str], metrics: str) -> None:
    """The candidate's metrics must be of this generator, evaluator, data and settings, or the
    comparison with the re-scored champion would mix feature spaces."""
    have = scores.get("lineage") or {}
    wrong = [k for k, v in expected.items() if have.get(k) != v]
    if wrong:
        raise UserError(f"{metrics} was computed for another {', '.join(k.removesuffix('_sha256') for k in wrong)} "
                        f"than register's inputs; rerun the evaluate stage (dvc repro evaluate)")


def rescore_champion(reg: Registry, champion: ModelVersion, scorer: Scorer) -> tuple[dict[str, float] | None, str | None]:
    """The champion's own generator, fetched from the registry and scored by ``scorer``:
    (metrics, None), or (None, why it cannot be re-scored)."""
    with tempfile.TemporaryDirectory(prefix="aigc-champion-") as tmp:
        try:
            files = reg.download(champion, tmp)
        except Exception as exc:  # a missing or unreadable artifact store, whatever the backend says
            return None, f"its model cannot be downloaded: {type(exc).__name__}: {str(exc)[:200]}"
        if "generator" not in files or not files["generator"].exists():
            return None, "its registered model holds no generator file"
        try:
            G, net = load_generator(files["generator"])
        except UserError as exc:
            return None, str(exc)
        if net.image_shape != scorer.image_shape:
            return None, f"it makes {net.image_shape} images but the data is {scorer.image_shape}"
        scores, _, _, _ = scorer.score(G, net.z_dim, net.classes)
    return scores, None


def candidate_record(run_info: dict[str, Any], numbers: dict[str, float], generator_sha: str,
                     scorer: Scorer) -> dict[str, Any]:
    """What the candidate is judged and tagged on: its hashes, the training's run, commit and
    privacy guarantee, and its metrics (NaN/inf as text: registry.json stays strict JSON)."""
    return {
        "generator_sha256": generator_sha,
        "evaluator_sha256": scorer.lineage["evaluator_weights_sha256"],
        "run_id": run_info.get("run_id"),
        "dataset_sha256": run_info.get("dataset_sha256"),
        "git_commit": run_info.get("git_commit"),
        "params_sha256": params_hash(run_info.get("params", {})),
        "privacy": run_info.get("privacy") or {"dp": False},  # the training's DP guarantee (pipeline/train.py)
        "metrics": {k: (v if math.isfinite(v) else str(v)) for k, v in numbers.items()},
    }


def register_generator(cfg: RegisterConfig, evaluate: EvaluateConfig, tracking: TrackingConfig,
                       run_info: dict[str, Any], scores: dict[str, Any], gate: dict[str, Any], *, generator: str,
                       evaluator: str, processed: str, cache_dir: str | None, metrics: str, registry: str,
                       log_model: LogModel, started: float | None = None, device: str = "auto") -> Registration:
    """Register GENERATOR as a new version of ``cfg.model_name``; move ``cfg.alias`` to it only if it
    passes the gates and beats the current champion, re-scored with EVALUATOR on PROCESSED, on
    ``cfg.metric`` by a margin its spread justifies.

    ``run_info``, ``scores`` and ``gate`` are the run file, the candidate's metrics (the file
    METRICS) and the data-quality summary; ``registry`` names the record the stage writes (for the
    message when the server fails); ``started`` (``time.perf_counter()``): when the stage began.
    """
    t_start = time.perf_counter() if started is None else started

    # (1) The candidate's numbers must be of these very inputs.
    scorer = Scorer.open(evaluate, evaluator, processed, cache_dir, device)
    generator_sha = file_sha256(generator)
    check_lineage(scores, {"generator_sha256": generator_sha} | scorer.lineage, metrics)

    # (2) Is the generator broken? NaN or constant output is refused whatever the metrics say.
    G, net = load_generator(generator)
    problem = output_problem(sample(G, net.z_dim, cfg.check_samples, seed=0), cfg.min_output_std)
    numbers = {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    candidate = candidate_record(run_info, numbers, generator_sha, scorer)
    judged = numbers | {"not_available": scorer.unavailable}  # the gates say why a class score is missing
    privacy = candidate["privacy"]
    record: dict[str, Any] = {"model_name": cfg.model_name, "alias": cfg.alias}

    tracker = Run.attach(run_info, tracking)
    if not tracker.active:
        decision = decide(judged, None, cfg, gate.get("passed"), problem, privacy=privacy)
        record |= {"outcome": "not registered", "promoted": False,
                   "reason": "tracking is off (tracking.enabled: false, or the training recorded no run): "
                             f"nothing registered. The gates alone would have {decision.outcome} it: {decision.reason}",
                   "decision": decision.to_dict(), "candidate": candidate}
        return Registration(record, record["reason"])

    # Every MLflow call from here on: a server that fails past MLflow's own retries ends the stage
    # with one line. A rerun is safe: a version registered already is found by its generator hash
    # and reused, and a promotion already made leaves the candidate the champion ("kept").
    with tracker.failing_as(f"the register stage judged and registered {generator} (run {tracker.run_id})",
                            f"{registry} is not written and the stage is not done: when the server answers "
                            "again, run `dvc repro` (a version registered already is reused, not registered twice)"):
        # (3) The champion now, re-scored in this feature space; whether this very generator was
        # registered before (a rerun).
        reg = Registry(tracker.uri)

        def judge(champion: ModelVersion | None) -> tuple[Any, dict[str, float] | None, str | None, float]:
            is_champion = champion is not None and champion.tags.get(GENERATOR_TAG) == generator_sha
            rescored, champion_problem, seconds = None, None, 0.0
            if champion is not None and not is_champion:
                t = time.perf_counter()
                rescored, champion_problem = rescore_champion(reg, champion, scorer)
                seconds = time.perf_counter() - t
            decision = decide(judged, rescored, cfg, gate.get("passed"), problem,
                              champion_version=champion.version if champion else None, is_champion=is_champion,
                              champion_problem=champion_problem, privacy=privacy)
            return decision, rescored, champion_problem, seconds

        champion = reg.by_alias(cfg.model_name, cfg.alias)
        decision, rescored, champion_problem, t_rescore = judge(champion)

        # (4) The version: logged into the training's run, tagged with everything it was judged on.
        version = reg.find(cfg.model_name, GENERATOR_TAG, generator_sha)
        reused = version is not None
        if version is None:
            version = _log_and_register(tracker, reg, cfg, generator, evaluator, net, candidate, gate.get("passed"),
                                        scorer.lineage, log_model)

        # (5) Promotion is a compare-and-set: the alias moves only if it still points at the champion
        # this decision was made against. Another register stage (a parallel experiment, a teammate)
        # may have moved it meanwhile; then the candidate is judged again against the new champion.
        superseded = []  # the champions the alias moved past while this stage was deciding
        while decision.promote:
            moved, now = reg.compare_and_set_alias(version, cfg.alias, champion.version if champion else None)
            if moved:
                break
            superseded.append(champion.version if champion else None)
            print(f"@{cfg.alias} moved to v{now.version if now else '?'} while this stage decided against "
                  f"{f'v{champion.version}' if champion else 'no champion'}: deciding again")
            if len(superseded) > MAX_REDECISIONS:
                raise UserError(f"@{cfg.alias} of {cfg.model_name} kept moving while this stage decided "
                                f"({len(superseded)} times); rerun the register stage when the other runs are done")
            champion = now
            decision, rescored, champion_problem, more = judge(champion)
            t_rescore += more
        reg.set_tags(version, {"aigc.decision": decision.outcome, "aigc.reason": decision.reason[:4000]})
        tracker.set_tags({"aigc.registered_model": cfg.model_name, "aigc.registered_version": version.version,
                          "aigc.registry_decision": decision.outcome})

        now = reg.by_alias(cfg.model_name, cfg.alias)
    record |= {
        "outcome": decision.outcome,
        "promoted": decision.promote,
        "reason": decision.reason,
        "version": version.version,
        "version_uri": version.uri,
        "reused_version": reused,
        "champion_uri": f"models:/{cfg.model_name}@{cfg.alias}",
        "champion_version": now.version if now else None,
        "previous_champion": None if champion is None else {
            "version": champion.version,
            "rescored_metrics": rescored,  # in this feature space: what the decision compared
            "rescore_problem": champion_problem,
            "registered_metrics": tag_metrics(champion.tags),  # as scored when it was registered (for reference only)
            "same_evaluator_as_when_registered":
                champion.tags.get("aigc.evaluator_sha256") == scorer.lineage["evaluator_weights_sha256"],
        },
        "decision": decision.to_dict(),
        "candidate": candidate,
        "lineage": scorer.lineage,
        "decided_again_after_alias_moved_from": superseded,  # [] unless another stage promoted meanwhile
        "seconds": {"total": round(time.perf_counter() - t_start, 2), "rescore_champion": round(t_rescore, 2)},
        "tracking_uri": tracker.uri,
    }
    where = f"@{cfg.alias} -> v{now.version}" if now else f"no @{cfg.alias} yet"
    rescore = f" (champion re-scored in {t_rescore:.1f} s)" if rescored is not None else ""
    return Registration(record, f"{cfg.model_name} v{version.version}{' (already registered)' if reused else ''}: "
                                f"{decision.outcome}: {decision.reason}; {where}{rescore}")


def _log_and_register(tracker: Run, reg: Registry, cfg: RegisterConfig, generator: str, evaluator: str,
                      net: NetConfig, candidate: dict[str, Any], data_gate_passed: Any, lineage: dict[str, str],
                      log_model: LogModel) -> ModelVersion:
    """The generator (with its evaluator) logged into the training's run and registered as a new
    version of ``cfg.model_name``, tagged with everything it was judged on."""
    with tempfile.TemporaryDirectory(prefix="aigc-register-") as tmp:
        # Stable artifact names inside the model, whatever the files are called in the workspace.
        artifacts = {"generator": str(shutil.copy2(generator, Path(tmp) / "generator.pt")),
                     "evaluator": str(shutil.copy2(evaluator, Path(tmp) / "evaluator.pt"))}
        model_uri = log_model(tracker, artifacts, net)
    tags = {f"{METRIC_TAG}{k}": v for k, v in candidate["metrics"].items()} | {
        GENERATOR_TAG: candidate["generator_sha256"],
        "aigc.evaluator_sha256": candidate["evaluator_sha256"],  # the weights' hash, as the run's eval tags
        "aigc.eval_data_sha256": lineage["data_sha256"],
        "aigc.eval_settings_sha256": lineage["settings_sha256"],
        "aigc.dataset_sha256": candidate["dataset_sha256"] or "",
        "aigc.params_sha256": candidate["params_sha256"],
        "aigc.git_commit": candidate["git_commit"] or "",
        "aigc.data_gate_passed": str(data_gate_passed).lower(),
        "aigc.family": net.family,
        # the privacy guarantee it was trained with (a team's private alias filters on these)
        "aigc.dp": str(bool(candidate["privacy"].get("dp"))).lower(),
        **({"aigc.dp.epsilon": str(candidate["privacy"]["epsilon"]), "aigc.dp.delta": str(candidate["privacy"]["delta"])}
           if candidate["privacy"].get("dp") else {}),
    }
    return reg.register(model_uri, cfg.model_name, tags)
