"""MkDocs hook: the params reference page, generated from the config models (aigc/config.py) at
every build, so it cannot drift from the code: each key's type or allowed values, bounds, default
(= params.yaml's value; tests/test_config.py compares them) and description."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

MARKER = "<!-- params-reference -->"


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type(typing.get_args(annotation)[0])
    if origin in (list, dict):
        args = ", ".join(_type(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _bounds(field: Any) -> str:
    parts = []
    for m in field.metadata:
        for name, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="),
                          ("max_length", "length <="), ("pattern", "matches")):
            if getattr(m, name, None) is not None:
                parts.append(f"{sym} {getattr(m, name)}")
    return ", ".join(parts)


def _default(field: Any) -> str:
    value = field.default if field.default is not PydanticUndefined else field.default_factory()
    if isinstance(value, BaseModel):
        return ""
    return f"`{json.dumps(value)}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(key, type, bounds, default, description) of every leaf of ``model``, depth first."""
    out = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += rows(sub, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", _type(sub), _bounds(field), _default(field),
                        (field.description or "").replace("|", "\\|").replace("\n", " ")))
    return out


def reference() -> str:
    from aigc.config import Params

    lines, section = [], None
    for key, kind, bounds, default, text in rows(Params):
        top = key.split(".")[0] if "." in key else "(top level)"
        if top != section:
            section = top
            model = Params.model_fields[top].annotation if top in Params.model_fields and "." in key else None
            doc = " ".join((model.__doc__ or "").split()) if model is not None else ""
            lines += ["", f"## `{top}`" if top != "(top level)" else "## Top level", ""]
            if doc:
                lines += [doc, ""]
            lines += ["| key | type | bounds | default | what it does |", "| --- | --- | --- | --- | --- |"]
        lines.append(f"| `{key}` | {kind} | {bounds} | {default} | {text} |")
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown
