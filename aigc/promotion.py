"""Champion promotion: may a newly trained generator replace the current champion?

Pure decision logic, no MLflow (the register stage, ``pipeline/register.py``, wires it to the
registry through ``aigc/tracking``):

    problem = output_problem(sample(G, z_dim, 64, seed=0), min_std=0.01)  # NaN/constant output?
    decision = decide(candidate_metrics, rescored_champion_metrics, cfg, data_gate_passed=True,
                      output_problem=problem)
    decision.promote, decision.outcome, decision.reason

The rule (docs/registry.md):

1. a broken generator (NaN/inf or constant output) is refused;
2. every gate must pass: the data gate, the covered modes, memorisation (the DCR ratio and the
   near-duplicate share), the privacy budget when ``register.max_epsilon`` is set (trained with
   differential privacy at epsilon <= it), and the compared metric must be a finite number;
3. the first version that passes the gates becomes the champion; a later one is compared with
   the champion *re-scored in the same feature space* (the register stage scores the champion's
   own generator with the candidate's evaluator, data and settings; numbers from another
   evaluator are never compared -- a champion that cannot be re-scored is never replaced
   automatically). It must beat it on ``register.metric`` by more than ``register.margin_se``
   standard errors of the difference and by more than ``register.min_improvement``: noise
   does not move the champion, and a tie is not a win.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from aigc.config import RegisterConfig
from aigc.io import params_sha256

Direction = Literal["lower", "higher", "closer"]

# Which way is better, per metric of reports/metrics.json (aigc/metrics). Explicit, so a new
# metric cannot be compared the wrong way round by accident. "closer": closer to the floor (the
# real data's own value) is better, whichever side -- IS rises above the data's value for a
# generator of over-confident prototypes, and density above 1 for one that crowds the densest
# real regions.
DIRECTIONS: dict[str, Direction] = {
    "fid": "lower",
    "kid": "lower",
    "class_kl": "lower",
    "is": "closer",
    "precision": "higher",
    "recall": "higher",
    "density": "closer",
    "coverage": "higher",
    "modes": "higher",
    "dcr_score": "higher",
    "copy_share": "lower",
}

Outcome = Literal["promoted", "refused", "kept"]


@dataclass(frozen=True)
class Gate:
    """One check a candidate must pass to be promoted."""

    name: str
    passed: bool
    observed: Any
    bound: str

    def describe(self) -> str:
        return f"{self.name} = {self.observed} (needs {self.bound})"


@dataclass(frozen=True)
class Decision:
    promote: bool
    outcome: Outcome  # promoted | refused | kept (the candidate already is the champion)
    reason: str  # one sentence a person reads in reports/registry.json and the stage log
    metric: str
    direction: Direction
    relative_to_floor: bool
    candidate_value: float | None
    champion_value: float | None
    margin: float | None = None  # what the candidate had to beat the champion by
    gates: list[Gate] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gates"] = {g.name: {"passed": g.passed, "observed": g.observed, "bound": g.bound} for g in self.gates}
        return d


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def compared_value(metrics: dict[str, Any] | None, metric: str, relative_to_floor: bool) -> float | None:
    """The number compared between versions: ``metric`` itself, or ``metric - metric_floor``
    (how far from what real held-out images score); ``|metric - metric_floor|`` for a metric whose
    best value is its floor (``closer``). None when missing or not finite."""
    if not metrics:
        return None
    value = metrics.get(metric)
    if DIRECTIONS[metric] == "closer" or relative_to_floor:
        floor = metrics.get(f"{metric}_floor")
        value = value - floor if _finite(value) and _finite(floor) else None
        if value is not None and DIRECTIONS[metric] == "closer":
            value = abs(value)
    return float(value) if _finite(value) else None


def better(a: float, b: float, direction: Direction, margin: float = 0.0) -> bool:
    """``a`` beats ``b`` by more than ``margin`` in ``direction`` (``closer``: ``a`` and ``b`` are
    distances to the floor, lower wins); a tie is not a win."""
    return a > b + margin if direction == "higher" else a < b - margin


def difference_se(candidate: dict[str, Any], champion: dict[str, Any], metric: str) -> float | None:
    """Standard error of (candidate - champion) on ``metric``: the two scores' errors in quadrature
    (independent generators, scored on the same reference). None when either has no spread."""
    a, b = candidate.get(f"{metric}_se"), champion.get(f"{metric}_se")
    return math.hypot(a, b) if _finite(a) and _finite(b) else None


def output_problem(images: torch.Tensor, min_std: float) -> str | None:
    """Why a generator's sample (N, C, H, W, in [-1, 1]) looks broken, or None when it does not.

    Broken: any NaN/inf pixel; every pixel (nearly) the same value; every sample (nearly) the
    same image. ``min_std`` is in the [-1, 1] pixel scale.
    """
    x = images.detach().double()
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        return f"{bad} of {x.numel()} output pixels are NaN or inf"
    overall = float(x.std()) if x.numel() > 1 else 0.0
    if overall < min_std:
        return f"constant output: pixel std {overall:.2e} < {min_std}"
    if len(x) > 1:
        across = float(x.std(dim=0).mean())  # per-pixel spread across samples
        if across < min_std:
            return f"every sample is the same image: std across samples {across:.2e} < {min_std}"
    return None


def privacy_gate(privacy: dict[str, Any] | None, max_epsilon: float) -> Gate:
    """Trained with DP at epsilon <= ``max_epsilon``? ``privacy``: run.json's ``privacy``
    (``{"dp": bool, "epsilon", "delta", ...}``; None for a run that predates it)."""
    bound = f"differential privacy with epsilon <= {max_epsilon:g} (register.max_epsilon)"
    if not privacy or not privacy.get("dp"):
        return Gate("privacy", False, "no DP guarantee (trained without privacy.dp.enabled)", bound)
    eps, delta = privacy.get("epsilon"), privacy.get("delta")
    ok = _finite(eps) and eps <= max_epsilon
    return Gate("privacy", bool(ok), f"epsilon {eps} at delta {delta}" if _finite(eps) else repr(eps), bound)


def gates(candidate: dict[str, Any], cfg: RegisterConfig, data_gate_passed: bool | None,
          output_problem: str | None, privacy: dict[str, Any] | None = None) -> list[Gate]:
    """Every gate of ``register:`` on the candidate's metrics (reports/metrics.json) and, with
    ``register.max_epsilon``, its privacy guarantee (``privacy``: run.json's)."""
    out = [Gate("output", output_problem is None, output_problem or "finite, varied images",
                "finite, non-constant samples")]
    if cfg.require_data_gate:
        out.append(Gate("data_gate", data_gate_passed is True, data_gate_passed, "passed (register.require_data_gate)"))
    modes, classes = candidate.get("modes"), candidate.get("classes")
    if cfg.min_modes_covered > 0 and "modes" in (candidate.get("not_available") or {}):
        # unlabelled data: no classes to cover; said in the decision, not silently dropped
        out.append(Gate("modes", True, candidate["not_available"]["modes"],
                        f">= {cfg.min_modes_covered:g} x classes (register.min_modes_covered): skipped, no classes"))
    elif cfg.min_modes_covered > 0:
        need = cfg.min_modes_covered * classes if _finite(classes) else None
        ok = _finite(modes) and need is not None and modes >= need - 1e-9
        out.append(Gate("modes", bool(ok), modes if _finite(modes) else repr(modes),
                        f">= {cfg.min_modes_covered:g} x {classes} classes (register.min_modes_covered)"))
    if cfg.min_dcr_score > 0:
        dcr = candidate.get("dcr_score")
        ok = _finite(dcr) and dcr >= cfg.min_dcr_score
        out.append(Gate("dcr_score", bool(ok), dcr if _finite(dcr) else repr(dcr),
                        f">= {cfg.min_dcr_score:g} (register.min_dcr_score; 1 = as far from the training "
                        f"set as fresh real images)"))
    if cfg.max_copy_share < 1:
        share = candidate.get("copy_share")
        ok = _finite(share) and share <= cfg.max_copy_share
        out.append(Gate("copy_share", bool(ok), share if _finite(share) else repr(share),
                        f"<= {cfg.max_copy_share:g} (register.max_copy_share; near-duplicates of training images)"))
    if cfg.max_epsilon is not None:
        out.append(privacy_gate(privacy, cfg.max_epsilon))
    value = compared_value(candidate, cfg.metric, cfg.relative_to_floor)
    what = f"{cfg.metric} - {cfg.metric}_floor" if cfg.relative_to_floor else cfg.metric
    missing = (candidate.get("not_available") or {}).get(cfg.metric) or repr(candidate.get(cfg.metric))
    out.append(Gate("metric", value is not None, value if value is not None else missing,
                    f"a finite {what}"))
    return out


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None, cfg: RegisterConfig,
           data_gate_passed: bool | None, output_problem: str | None = None,
           champion_version: str | None = None, is_champion: bool = False,
           champion_problem: str | None = None, privacy: dict[str, Any] | None = None) -> Decision:
    """Promote the candidate, or refuse it, with the reason.

    ``candidate``: metrics as reports/metrics.json holds them. ``champion``: the champion's
    metrics *re-scored* with the candidate's evaluator, data and settings (None when there is no
    champion yet). ``champion_problem``: why the champion could not be re-scored (then nothing is
    compared and the candidate is refused). ``champion_version`` only names it in the reason.
    ``is_champion``: the candidate is the very generator the alias already points at (a rerun
    of the stage): nothing moves. ``privacy``: the training's guarantee (run.json ``privacy``), for
    the ``register.max_epsilon`` gate.
    """
    direction = DIRECTIONS[cfg.metric]
    if direction == "closer":
        what = f"|{cfg.metric} - floor|"
    else:
        what = f"{cfg.metric} - floor" if cfg.relative_to_floor else cfg.metric
    cand = compared_value(candidate, cfg.metric, cfg.relative_to_floor)
    champ = compared_value(champion, cfg.metric, cfg.relative_to_floor) if champion is not None else None
    se = difference_se(candidate, champion, cfg.metric) if champion is not None else None
    margin = max(cfg.min_improvement, cfg.margin_se * se) if se is not None else None
    checks = gates(candidate, cfg, data_gate_passed, output_problem, privacy)
    common = dict(metric=cfg.metric, direction=direction, relative_to_floor=cfg.relative_to_floor,
                  candidate_value=cand, champion_value=champ, margin=margin, gates=checks)
    who = f"champion v{champion_version}" if champion_version else "the champion"

    if is_champion:
        return Decision(False, "kept", f"this generator already is {who}; nothing to move", **common)
    failed = [g for g in checks if not g.passed]
    if failed:
        return Decision(False, "refused", "failed gate(s): " + "; ".join(g.describe() for g in failed), **common)
    if champion is None and champion_problem is None:
        return Decision(True, "promoted", f"first version to pass the gates ({what} = {cand:.4g})", **common)
    if champion_problem is not None:
        return Decision(False, "refused", f"{who} cannot be re-scored with this evaluator and data "
                                          f"({champion_problem}), so the two cannot be compared; move the alias "
                                          f"by hand if this version should replace it", **common)
    if champ is None:
        return Decision(False, "refused", f"{who}'s re-scored {what} is not a finite number, so it cannot be "
                                          f"compared; move the alias by hand if this version should replace it",
                        **common)
    word = "lower" if direction == "lower" else "higher" if direction == "higher" else "closer to the floor"
    if margin is None:
        if cfg.margin_se > 0:
            return Decision(False, "refused", f"{what} {cand:.4g} against {who}'s {champ:.4g}: no spread to tell "
                                              f"them apart from noise (one scored set; raise evaluate.num_samples "
                                              f"to at least twice the test split, or set register.margin_se: 0)",
                            **common)
        margin = cfg.min_improvement
        common["margin"] = margin
    how = (f"by more than {margin:.3g} ({cfg.margin_se:g} x the difference's standard error {se:.3g})"
           if se is not None and margin > cfg.min_improvement else f"by more than {margin:.3g}")
    if better(cand, champ, direction, margin):
        return Decision(True, "promoted", f"{what} {cand:.4g} beats {who}'s {champ:.4g} (re-scored) {how} "
                                          f"({word} is better)", **common)
    return Decision(False, "refused", f"{what} {cand:.4g} does not beat {who}'s {champ:.4g} (re-scored) {how} "
                                      f"({word} is better)", **common)


params_hash = params_sha256  # aigc/io.py: the train stage names and tags its run with the same hash
