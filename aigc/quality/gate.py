"""The data-quality and privacy gate: detect personal data, scrub it, then validate everything.

    result = run_gate(ds, cfg.validate, cfg.privacy, cfg.data.blank_std, salt)
    result.passed, result.summary, result.scrubbed, result.failure_message()

1. **Detect**: the PII expectations run on the raw metadata; each column that fails one is
   flagged, with the kinds found and the record ids (never the values).
2. **Scrub**: ``privacy:`` decides, per flagged column: drop, hash (salted) or keep.
3. **Gate**: the whole suite (data quality + PII again, minus the columns kept by opt-in)
   runs on the scrubbed records. A critical expectation that fails fails the gate; those
   listed in ``validate.warn`` are only reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from aigc.config import PrivacyConfig, ValidateConfig
from aigc.data.sources import RawDataset
from aigc.privacy.pii import SALT_ENV, scrub
from aigc.quality.suite import Outcome, pii_checks, quality_checks, run_checks
from aigc.quality.summary import record_stats, with_metadata

FORMAT = "aigc.data_quality/1"
MAX_LISTED = 5  # record ids named in the one-line failure message


@dataclass
class PiiFinding:
    """A metadata column that held personal data before the scrub, and what was done about it."""

    column: str
    kinds: list[str]
    records: int  # records with at least one finding in this column
    ids: list[int]
    action: str  # drop | hash | keep


@dataclass
class GateResult:
    passed: bool
    outcomes: list[Outcome]  # the gate, on the scrubbed records
    pii: list[PiiFinding]  # what the scrub found and did, before the gate
    actions: dict[str, str]  # every scrubbed column -> its action (flagged or named in privacy.columns)
    scrubbed: RawDataset
    frame: pd.DataFrame  # the per-record summary the gate validated
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failed_critical]

    @property
    def warnings(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.success and o.severity == "warning"]

    def failure_message(self) -> str:
        """One line: the first critical failure's expectation, observed value, bound and records."""
        if not self.failures:
            return "data-quality gate passed"
        first, *rest = self.failures
        c = first.check
        msg = f"data-quality gate failed: {c.key}: {c.what} = {_fmt(first.observed)}, bound {c.bound}"
        if first.ids:
            more = f" (and {len(first.ids) - MAX_LISTED} more)" if len(first.ids) > MAX_LISTED else ""
            msg += f"; first offending records (id): {', '.join(map(str, first.ids[:MAX_LISTED]))}{more}"
        elif first.offending is None:
            msg += "; a property of the whole dataset (no single record)"
        if rest:
            msg += f"; {len(rest)} more critical: {', '.join(o.check.key for o in rest)}"
        return msg

    def headline(self) -> dict[str, Any]:
        """The verdict and counts: the few numbers ``dvc exp show`` lists for the gate (the detail
        stays in the summary; no failure count: a gate that failed stopped the pipeline)."""
        c = self.summary["counts"]
        return {"dq_passed": self.summary["passed"], "dq_records": c["records"], "dq_warnings": c["warnings"]}

    def metrics(self, seconds: float) -> dict[str, float]:
        """One chart group for a tracker: dq/passed, dq/<count>, dq/<expectation>_observed."""
        return ({"dq/passed": float(self.passed), "dq/seconds": seconds}
                | {f"dq/{k}": v for k, v in self.summary["counts"].items()}
                | {f"dq/{o.check.key}_observed": float(o.observed) for o in self.outcomes
                   if o.check.column is None and isinstance(o.observed, (int, float))})

    def notes(self) -> list[str]:
        """What the scrub did and what only warned, a line each."""
        return ([f"privacy: column {p.column!r} ({', '.join(p.kinds)}; {p.records} records): {p.action}"
                 for p in self.pii]
                + [f"warning: {o.check.key}: {o.check.what} = {o.observed}, bound {o.check.bound}"
                   for o in self.warnings])

    def done(self, seconds: float, out: str) -> str:
        """The line a passed gate ends with."""
        c = self.summary["counts"]
        return (f"data-quality gate passed in {seconds:.2f} s: {c['records']} records, {c['expectations']} "
                f"expectations, {c['warnings']} warning(s), {c['pii_columns']} column(s) with personal data "
                f"scrubbed; wrote {out}")


def _fmt(value: Any) -> str:
    if isinstance(value, list) and len(value) > 12:
        return "[" + ", ".join(map(str, value[:12])) + f", ... {len(value)} in all]"
    return str(value)


def _findings(outcomes: list[Outcome], actions: dict[str, str], columns: list[str]) -> list[PiiFinding]:
    by_col: dict[str, tuple[list[str], set[int]]] = {}
    order = {c: i for i, c in enumerate(columns)}
    for o in sorted(outcomes, key=lambda o: order.get(o.check.column, len(order))):
        if not o.success:
            kinds, ids = by_col.setdefault(o.check.column, ([], set()))
            kinds.append(o.check.kind)
            ids.update(o.ids)
    return [PiiFinding(col, kinds, len(ids), sorted(ids), actions[col]) for col, (kinds, ids) in by_col.items()]


def run_gate(ds: RawDataset, cfg: ValidateConfig, privacy: PrivacyConfig, blank_std: float,
             salt: str | None) -> GateResult:
    """Detect and scrub personal data in ``ds.metadata``, then validate the scrubbed records."""
    stats = record_stats(ds, blank_std)

    # 1. detect, on the raw metadata (warnings do not apply: this is the scan, not the gate)
    raw_frame = with_metadata(stats, ds.metadata)
    detected = run_checks(raw_frame, pii_checks(raw_frame, privacy), warn=[], name="pii-scan")
    flagged = [c for c in ds.metadata.columns if any(o.check.column == c and not o.success for o in detected)]

    # 2. scrub
    scrubbed = scrub(ds, flagged, privacy, salt)
    kept = {c for c, a in scrubbed.actions.items() if a == "keep"}

    # 3. gate, on what will be written
    frame = with_metadata(stats, scrubbed.dataset.metadata)
    checks = quality_checks(cfg, frame) + pii_checks(frame, privacy, exempt=kept)
    outcomes = run_checks(frame, checks, warn=list(cfg.warn), name="data-quality")
    passed = not any(o.failed_critical for o in outcomes)
    found = _findings(detected, scrubbed.actions, list(ds.metadata.columns))
    result = GateResult(passed, outcomes, found, scrubbed.actions, scrubbed.dataset, frame)
    result.summary = _summary(result, ds, privacy)
    return result


def _summary(r: GateResult, ds: RawDataset, privacy: PrivacyConfig) -> dict[str, Any]:
    """The JSON summary (DVC metrics): pass/fail, counts, every expectation, the privacy actions."""
    f = r.frame
    n, h, w, c = ds.images.shape
    labelled = f["class"].dropna().astype(int)
    return {
        "format": FORMAT,
        "passed": r.passed,
        "counts": {
            "records": int(n),
            "labelled": int(len(labelled)),
            "classes": int(labelled.nunique()),
            "duplicates": int(f["duplicate"].sum()),
            "blank": int(f["blank"].sum()),
            "expectations": len(r.outcomes),
            "failed_critical": len(r.failures),
            "warnings": len(r.warnings),
            "pii_columns": len(r.pii),
        },
        "dataset": {
            "shape": [int(h), int(w), int(c)],
            "dtype": str(ds.images.dtype),
            "class_counts": {str(k): int(v) for k, v in zip(*np.unique(labelled, return_counts=True))},
            "metadata_columns": [str(col) for col in r.scrubbed.metadata.columns],
        },
        "expectations": {o.check.key: o.to_dict() for o in r.outcomes},
        "privacy": {
            "default_action": privacy.action,
            "salt_env": SALT_ENV,  # the variable's name; its value is never written
            "found": {p.column: {"kinds": p.kinds, "records": p.records, "first_ids": p.ids[:20], "action": p.action}
                      for p in r.pii},
            "actions": dict(r.actions),
            "kept_by_opt_in": sorted(col for col, a in r.actions.items() if a == "keep"),
        },
    }
