"""The data-quality report a person reads: one self-contained HTML page.

great-expectations' Data Docs load their CSS and JavaScript from CDNs and come out unstyled
offline (stack.md), so the page is rendered here: inline CSS, images as data: URIs, no
scripts, no external fonts. It never shows a metadata value (they may be personal data):
columns, kinds, counts and record ids only.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from aigc.quality.gate import GateResult
from aigc.quality.suite import Outcome

THUMB = 64  # thumbnails are scaled up (nearest neighbour) to at least this many pixels

CSS = """
:root { --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --ink: #1f2328; --muted: #59636e;
        --line: #d1d9e0; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #fff; }
header { padding: 24px 40px; color: #fff; }
header.passed { background: linear-gradient(90deg, #1a7f37, #2da44e); }
header.failed { background: linear-gradient(90deg, #a40e26, #cf222e); }
header h1 { margin: 0 0 4px; font-size: 26px; font-weight: 600; }
header p { margin: 0; opacity: .9; }
main { padding: 8px 40px 40px; max-width: 1200px; }
h2 { font-size: 19px; margin: 32px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 20px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 120px;
        background: var(--bg); }
.card b { display: block; font-size: 22px; }
.card span { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num { font-variant-numeric: tabular-nums; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--bg);
       padding: 1px 4px; border-radius: 4px; }
.pill { display: inline-block; padding: 1px 10px; border-radius: 999px; font-size: 12px; font-weight: 600;
        color: #fff; }
.pill.pass { background: var(--ok); } .pill.fail { background: var(--bad); } .pill.warn { background: var(--warn); }
.pill.drop { background: #57606a; } .pill.hash { background: #0969da; } .pill.keep { background: var(--warn); }
.bar { display: flex; align-items: center; gap: 8px; margin: 3px 0; font-size: 13px; }
.bar .label { width: 70px; color: var(--muted); }
.bar .track { flex: 1; max-width: 500px; height: 14px; background: var(--bg); border: 1px solid var(--line);
              border-radius: 3px; overflow: hidden; }
.bar .fill { height: 100%; background: #0969da; }
.bar .fill.low { background: var(--bad); }
.thumbs { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; text-align: center; font-size: 12px; color: var(--muted); }
figure img { display: block; width: 72px; height: 72px; object-fit: contain; image-rendering: pixelated;
             border: 1px solid var(--line); border-radius: 4px; background: #000; }
.note { color: var(--muted); font-size: 13px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _png_uri(image: np.ndarray) -> str:
    """uint8 (H, W, C) -> a data: URI, scaled up by an integer factor so small digits stay crisp."""
    from PIL import Image

    h, w, c = image.shape
    k = max(1, -(-THUMB // max(h, w)))
    big = image.repeat(k, axis=0).repeat(k, axis=1)
    buf = io.BytesIO()
    Image.fromarray(big[..., 0] if c == 1 else big).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumbs(result: GateResult, ids: list[int], caption: Any = None) -> str:
    index = {int(i): k for k, i in enumerate(result.frame["id"])}
    labels = result.frame["label"].to_numpy()
    figs = []
    for i in ids:
        k = index.get(int(i))
        if k is None:
            continue
        text = caption(k) if caption else f"id {i} · label {labels[k]}"
        figs.append(f'<figure><img src="{_png_uri(result.scrubbed.images[k])}" alt="record {_e(i)}">'
                    f"<figcaption>{_e(text)}</figcaption></figure>")
    return f'<div class="thumbs">{"".join(figs)}</div>' if figs else ""


def _status(o: Outcome) -> str:
    if o.success:
        return '<span class="pill pass">pass</span>'
    if o.severity == "warning":
        return '<span class="pill warn">warning</span>'
    return '<span class="pill fail">FAIL</span>'


def _observed(value: Any) -> str:
    if isinstance(value, list):
        shown = ", ".join(map(str, value[:12])) + (f", … ({len(value)})" if len(value) > 12 else "")
        return _e(f"[{shown}]")
    return _e(value)


def _ids(o: Outcome) -> str:
    if not o.ids:
        return "—" if o.offending is None else "none"
    more = f" … (+{len(o.ids) - 10})" if len(o.ids) > 10 else ""
    return _e(", ".join(map(str, o.ids[:10])) + more)


def _expectation_rows(result: GateResult) -> str:
    rows = []
    # failures first, then warnings, then passes: what needs a person's attention on top
    order = sorted(result.outcomes, key=lambda o: (o.success, o.severity != "critical"))
    for o in order:
        c = o.check
        name = f"<code>{_e(c.name)}</code>" + (f" <span class='note'>{_e(c.column)} · {_e(c.kind)}</span>"
                                                if c.column else "")
        offending = "—" if o.offending is None else f"{o.offending:,}"
        rows.append(f"<tr><td>{_status(o)}</td><td>{name}<br><span class='note'>{_e(c.what)}</span></td>"
                    f"<td class='num'>{_observed(o.observed)}</td><td>{_e(c.bound)}</td>"
                    f"<td class='num'>{offending}</td><td class='num'>{_ids(o)}</td></tr>")
    return ("<table><tr><th>status</th><th>expectation</th><th>observed</th><th>bound</th>"
            "<th>offending records</th><th>first record ids</th></tr>" + "".join(rows) + "</table>")


def _class_bars(result: GateResult, min_share: float | None) -> str:
    counts = result.summary["dataset"]["class_counts"]
    total = sum(counts.values())
    if not total:
        return "<p class='note'>No labelled records: class checks do not apply.</p>"
    top = max(counts.values()) / total
    bars = []
    for k, v in counts.items():
        share = v / total
        low = " low" if min_share is not None and share < min_share else ""
        bars.append(f"<div class='bar'><span class='label'>class {_e(k)}</span><span class='track'>"
                    f"<span class='fill{low}' style='display:block;width:{100 * share / top:.1f}%'></span></span>"
                    f"<span>{v:,} ({share:.1%})</span></div>")
    return "".join(bars)


ACTION_TEXT = {"drop": "column removed", "hash": "values replaced by a salted SHA-256",
               "keep": "kept: explicit opt-in (privacy.action / privacy.columns)"}


def _privacy(result: GateResult) -> str:
    p = result.summary["privacy"]
    if not p["actions"]:
        return ("<p>No metadata column looked like personal data (e-mail addresses, phone numbers, "
                "national-ID-like numbers, street addresses, person names in name-like columns).</p>")
    rows = []
    for col, action in p["actions"].items():
        f = p["found"].get(col)
        kinds = ", ".join(k.replace("_", " ") for k in f["kinds"]) if f else "named in privacy.columns"
        records = f"{f['records']:,}" if f else "—"
        rows.append(f"<tr><td><code>{_e(col)}</code></td><td>{_e(kinds)}</td><td class='num'>{records}</td>"
                    f"<td><span class='pill {action}'>{_e(action)}</span> {_e(ACTION_TEXT[action])}</td></tr>")
    kept = p["kept_by_opt_in"]
    note = (f"<p class='note'>Kept by explicit opt-in, and excluded from the gate's PII check: "
            f"{_e(', '.join(kept))}.</p>" if kept else "")
    return ("<table><tr><th>column</th><th>found</th><th>records</th><th>action</th></tr>" + "".join(rows)
            + "</table>" + note
            + f"<p class='note'>The scrub runs before anything is written; values are never shown here. "
              f"Hash salt: the environment variable <code>{_e(p['salt_env'])}</code> (never written).</p>")


def _examples(result: GateResult, max_examples: int) -> str:
    parts = []
    for o in result.outcomes:
        if o.success or not o.ids or max_examples == 0 or o.check.name == "pii":
            continue
        kind = "failed" if o.severity == "critical" else "warning"
        parts.append(f"<h3><code>{_e(o.check.key)}</code> <span class='note'>{kind}: {_e(o.check.what)} = "
                     f"{_observed(o.observed)}, bound {_e(o.check.bound)}</span></h3>"
                     + _thumbs(result, o.ids[:max_examples]))
    return "".join(parts)


def render_html(result: GateResult, *, min_class_share: float | None = None, max_examples: int = 8,
                source: str = "", gx_version: str = "") -> str:
    """The whole page, as a string."""
    s = result.summary
    c = s["counts"]
    h, w, ch = s["dataset"]["shape"]
    verdict = "passed" if result.passed else "failed"
    title = "Data-quality gate " + verdict.upper()
    headline = (f"{len(result.outcomes)} expectations on {c['records']:,} records: "
                + (f"{c['failed_critical']} critical failure(s), " if c["failed_critical"] else "no critical failure, ")
                + f"{c['warnings']} warning(s); {c['pii_columns']} metadata column(s) with personal data found.")
    cards = [(f"{c['records']:,}", "records"), (f"{h}×{w}×{ch}", "image shape"), (c["classes"], "classes"),
             (c["duplicates"], "duplicates"), (c["blank"], "blank images"), (c["pii_columns"], "PII columns"),
             (c["failed_critical"], "critical failures"), (c["warnings"], "warnings")]
    n = len(result.frame)
    sample_ids = [int(result.frame["id"].iloc[k]) for k in np.linspace(0, n - 1, min(n, 16)).astype(int)] if n else []
    examples = _examples(result, max_examples)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{CSS}</style></head>
<body>
<header class="{verdict}"><h1>{_e(title)}</h1><p>{_e(headline)}</p></header>
<main>
<div class="cards">{"".join(f"<div class='card'><b>{_e(v)}</b><span>{_e(k)}</span></div>" for v, k in cards)}</div>
<h2>Expectations</h2>
{_expectation_rows(result)}
<p class="note">Bounds come from <code>validate:</code> in params.yaml; tune one with
<code>dvc exp run -S validate.max_duplicate_share=0.1</code>. Expectations listed in <code>validate.warn</code>
only warn.</p>
<h2>Examples of what failed</h2>
{examples or "<p class='note'>Nothing to show: no record-level expectation failed.</p>"}
<h2>Class balance</h2>
{_class_bars(result, min_class_share)}
<h2>Privacy (de-identification)</h2>
{_privacy(result)}
<h2>A sample of the records</h2>
{_thumbs(result, sample_ids)}
<footer>Source: {_e(source) or "—"} · great-expectations {_e(gx_version) or "—"} ·
format {_e(s["format"])} · a self-contained page: no scripts, styles or fonts from elsewhere.</footer>
</main></body></html>
"""
