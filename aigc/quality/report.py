"""The data-quality report a person reads: one self-contained HTML page.

great-expectations' Data Docs load their CSS and JavaScript from CDNs and come out unstyled
offline (docs/development.md, "The stack"), so the page is rendered here, from the Jinja2 template
``aigc/templates/data_quality.html.j2``: inline CSS, images as data: URIs, no scripts, no
external fonts. This module only gathers what the page shows. It never shows a metadata value
(they may be personal data): columns, kinds, counts and record ids only. With ``withheld``
(``privacy.encrypt_at_rest``) it shows no picture of a record either: the page is git-tracked
and logged to MLflow, where a record would sit in clear.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aigc.html import png_uri, render
from aigc.quality.gate import GateResult
from aigc.quality.suite import Outcome

THUMB = 64  # thumbnails are scaled up (nearest neighbour) to at least this many pixels
TEMPLATE = "data_quality.html.j2"

ACTION_TEXT = {"drop": "column removed", "hash": "values replaced by a salted SHA-256",
               "keep": "kept: explicit opt-in (privacy.action / privacy.columns)"}


def _thumbs(result: GateResult, ids: list[int]) -> list[dict[str, Any]]:
    index = {int(i): k for k, i in enumerate(result.frame["id"])}
    labels = result.frame["label"].to_numpy()
    return [{"uri": png_uri(result.scrubbed.images[index[int(i)]], THUMB), "id": i,
             "caption": f"id {i} · label {labels[index[int(i)]]}"} for i in ids if int(i) in index]


def _status(o: Outcome) -> tuple[str, str]:
    if o.success:
        return "pass", "pass"
    return ("warn", "warning") if o.severity == "warning" else ("fail", "FAIL")


def _observed(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value[:12])) + (f", … ({len(value)})" if len(value) > 12 else "") + "]"
    return str(value)


def _ids(o: Outcome) -> str:
    if not o.ids:
        return "—" if o.offending is None else "none"
    return ", ".join(map(str, o.ids[:10])) + (f" … (+{len(o.ids) - 10})" if len(o.ids) > 10 else "")


def _expectations(result: GateResult) -> list[dict[str, Any]]:
    rows = []
    # failures first, then warnings, then passes: what needs a person's attention on top
    for o in sorted(result.outcomes, key=lambda o: (o.success, o.severity != "critical")):
        status, text = _status(o)
        c = o.check
        rows.append({"status": status, "status_text": text, "name": c.name, "column": c.column, "kind": c.kind,
                     "what": c.what, "observed": _observed(o.observed), "bound": c.bound,
                     "offending": "—" if o.offending is None else f"{o.offending:,}", "ids": _ids(o)})
    return rows


def _class_bars(result: GateResult, min_share: float | None) -> list[dict[str, Any]]:
    counts = result.summary["dataset"]["class_counts"]
    total = sum(counts.values())
    if not total:
        return []
    top = max(counts.values()) / total
    return [{"label": k, "width": 100 * (v / total) / top, "low": min_share is not None and v / total < min_share,
             "text": f"{v:,} ({v / total:.1%})"} for k, v in counts.items()]


def _privacy(result: GateResult) -> dict[str, Any]:
    p = result.summary["privacy"]
    rows = []
    for col, action in p["actions"].items():
        f = p["found"].get(col)
        rows.append({"column": col, "action": action, "action_text": ACTION_TEXT[action],
                     "kinds": ", ".join(k.replace("_", " ") for k in f["kinds"]) if f else "named in privacy.columns",
                     "records": f"{f['records']:,}" if f else "—"})
    return {"rows": rows, "kept": p["kept_by_opt_in"], "salt_env": p["salt_env"]}


def _examples(result: GateResult, max_examples: int) -> list[dict[str, Any]]:
    return [{"key": o.check.key, "kind": "failed" if o.severity == "critical" else "warning", "what": o.check.what,
             "observed": _observed(o.observed), "bound": o.check.bound, "thumbs": _thumbs(result, o.ids[:max_examples])}
            for o in result.outcomes
            if not o.success and o.ids and max_examples > 0 and o.check.name != "pii"]


def render_html(result: GateResult, *, min_class_share: float | None = None, max_examples: int = 8,
                source: str = "", gx_version: str = "", withheld: bool = False) -> str:
    """The whole page, as a string; ``withheld``: no thumbnail of a record (encryption at rest)."""
    s = result.summary
    c = s["counts"]
    h, w, ch = s["dataset"]["shape"]
    verdict = "passed" if result.passed else "failed"
    headline = (f"{len(result.outcomes)} expectations on {c['records']:,} records: "
                + (f"{c['failed_critical']} critical failure(s), " if c["failed_critical"] else "no critical failure, ")
                + f"{c['warnings']} warning(s); {c['pii_columns']} metadata column(s) with personal data found.")
    cards = [(f"{c['records']:,}", "records"), (f"{h}×{w}×{ch}", "image shape"), (c["classes"], "classes"),
             (c["duplicates"], "duplicates"), (c["blank"], "blank images"), (c["pii_columns"], "PII columns"),
             (c["failed_critical"], "critical failures"), (c["warnings"], "warnings")]
    n = len(result.frame)
    sample_ids = [int(result.frame["id"].iloc[k]) for k in np.linspace(0, n - 1, min(n, 16)).astype(int)] if n else []
    examples = _examples(result, max_examples)
    if withheld:  # dropped before rendering: the page must not hold a picture of a record
        sample_ids = []
        examples = [ex | {"thumbs": []} for ex in examples]
    return render(TEMPLATE, title="Data-quality gate " + verdict.upper(), verdict=verdict, headline=headline,
                  cards=cards, expectations=_expectations(result), examples=examples, withheld=withheld,
                  class_bars=_class_bars(result, min_class_share), privacy=_privacy(result),
                  sample=_thumbs(result, sample_ids), source=source, gx_version=gx_version, format=s["format"])
