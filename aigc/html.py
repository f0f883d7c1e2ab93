"""Pages a person reads: Jinja2 templates (``aigc/templates/``) rendered into one self-contained
HTML file each -- inline CSS, images as ``data:`` URIs, charts as inline SVG, no scripts, nothing
from a CDN, so a page opens offline and can be mailed or logged as one MLflow artifact.

    render("run.html.j2", run=..., scores=...)  # -> str
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

TEMPLATES = Path(__file__).resolve().parent / "templates"

_env: Environment | None = None


def environment() -> Environment:
    """One Jinja2 environment: HTML autoescaped, a missing variable is an error, not a blank."""
    global _env
    if _env is None:
        _env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]),
                           undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        _env.filters["num"] = fmt_number
    return _env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def fmt_number(value: Any, digits: int = 4) -> str:
    """A number as a person reads it: 4 significant digits, thousands separated; '—' for none."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:,.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}g}"
    return str(value)


def png_uri(image: np.ndarray | bytes, min_side: int = 0) -> str:
    """A PNG as a ``data:`` URI: PNG bytes as they are, or a uint8 (H, W, C) array scaled up by an
    integer factor (nearest neighbour) to at least ``min_side`` pixels so small digits stay crisp."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        from PIL import Image

        h, w, c = image.shape
        k = max(1, -(-min_side // max(h, w))) if min_side else 1
        big = image.repeat(k, axis=0).repeat(k, axis=1)
        buf = io.BytesIO()
        Image.fromarray(big[..., 0] if c == 1 else big).save(buf, format="PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


PALETTE = ("#0969da", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#57606a")


def line_chart(x: Sequence[float], series: dict[str, Sequence[float]], *, width: int = 720, height: int = 260,
               x_label: str = "step", max_points: int = 600) -> Markup:
    """Line chart of ``series`` (name -> y values, NaN where a name was not reported) against ``x``,
    as inline SVG: axes with a few ticks, one coloured line per series, a legend."""
    left, right, top, bottom = 56, 12, 12, 40
    xs = np.asarray(x, dtype=float)
    ys = {k: np.asarray(v, dtype=float) for k, v in series.items()}
    finite = np.concatenate([v[np.isfinite(v)] for v in ys.values()]) if ys else np.array([])
    if len(xs) < 2 or finite.size == 0:
        return Markup('<p class="note">No values to plot.</p>')
    stride = max(1, len(xs) // max_points)  # every stride-th point: a few hundred are enough on screen
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = float(finite.min()), float(finite.max())
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 1, y1 + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    w, h = width - left - right, height - top - bottom

    def px(a: float) -> float:
        return left + (a - x0) / ((x1 - x0) or 1) * w

    def py(b: float) -> float:
        return top + (1 - (b - y0) / (y1 - y0)) * h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" class="chart">',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fff" stroke="#d1d9e0"/>']
    for t in np.linspace(y0 + pad, y1 - pad, 5):
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eef1f4"/>'
                     f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{escape(fmt_number(float(t), 3))}</text>')
    for t in np.linspace(x0, x1, 6):
        parts.append(f'<text x="{px(t):.1f}" y="{top + h + 16}" text-anchor="middle">{int(round(t)):,}</text>')
    parts.append(f'<text x="{left + w / 2:.1f}" y="{height - 4}" text-anchor="middle">{escape(x_label)}</text>')
    for i, (name, v) in enumerate(ys.items()):
        colour = PALETTE[i % len(PALETTE)]
        keep = np.isfinite(v)
        xi, vi = xs[keep][::stride], v[keep][::stride]
        if len(xi):
            points = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(xi, vi))
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.4" points="{points}"/>')
        lx = left + 10 + 120 * i
        parts.append(f'<rect x="{lx}" y="{top + 6}" width="12" height="4" fill="{colour}"/>'
                     f'<text x="{lx + 16}" y="{top + 12}">{escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
