"""The data-quality gate: great-expectations suites built in code, run on a per-record summary.

- :mod:`aigc.quality.summary` — the per-record frame (shape, dtype, range, NaN/inf, label,
  content hash, duplicate/blank flags, metadata columns): what GX validates, never pixels;
- :mod:`aigc.quality.suite` — the expectations, from ``validate:`` in params.yaml, and their run;
- :mod:`aigc.quality.gate` — detect personal data, scrub it (:mod:`aigc.privacy`), validate;
- :mod:`aigc.quality.report` — the self-contained HTML page.
"""

from aigc.quality.gate import GateResult, PiiFinding, run_gate

__all__ = ["GateResult", "PiiFinding", "run_gate"]
