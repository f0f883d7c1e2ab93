"""What every stage shares: its command line, its Prefect flow, and how it fails.

A stage module defines a plain function ``(sections..., paths...) -> dict`` and calls
``main(fn, sections=..., paths=...)`` under ``if __name__ == "__main__"``. ``sections`` names the
params sections the function takes, each as the keyword of the same name (``("data", "privacy")``)
or, as a mapping, under another keyword (``{"cfg": "register"}``: ``run_register(cfg, ...)``, whose
parameter does not shadow the function); ``name`` is the stage (its ``python -m pipeline.<name>``
and its flow's name), the function's own name by default. ``main``

1. validates params.yaml *before* Prefect starts (a typo costs no server start-up);
2. runs the function as a Prefect flow named after the stage, with the stage's own params
   sections and its paths (from dvc.yaml) as the flow's parameters (``run_as_flow``; under
   ``python -m aigc.services.prefect_server`` it first waits for the run's server, which starts
   beside the command, and runs without heartbeats, which that server would discard);
3. turns a ``UserError`` into one ``error:`` line and exit code 1 (no traceback wall); a bug
   still shows its traceback;
4. freezes the heap before the process exits (``gc.freeze``): Prefect's, MLflow's and torch's
   objects are then not walked again by the interpreter's final collections, which took ~0.8 s
   per stage process here for nothing (their memory goes back to the OS with the process).
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
from collections.abc import Callable, Mapping
from typing import Any

from aigc.config import DEFAULT_PARAMS, load_params
from aigc.errors import ConfigError, UserError

EXIT_USER_ERROR = 1


def as_flow(fn: Callable[..., Any], name: str):
    """``fn`` as a Prefect flow whose UserErrors end the run as Failed with their message only."""
    from prefect import flow
    from prefect.states import Failed

    @functools.wraps(fn)
    def body(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            return Failed(message=str(exc))

    return flow(name=name, log_prints=True, validate_parameters=False)(body)


def run_as_flow(fn: Callable[..., Any], name: str, kwargs: dict[str, Any]):
    """Run ``fn(**kwargs)`` as the stage's flow; returns its final Prefect state."""
    flow = as_flow(fn, name)  # imports Prefect: ~2 s, while the run's server may still be starting
    from prefect.settings import temporary_settings

    from aigc.services.prefect_server import await_server, flow_settings

    await_server()
    with temporary_settings(flow_settings()):
        return flow(**kwargs, return_state=True)


def read_stage_json(path: str, what: str, stage: str) -> dict[str, Any]:
    """A JSON file an earlier stage wrote, or a UserError saying which stage to (re)run."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found; run the {stage} stage first (dvc repro {stage})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is not valid JSON ({exc}); rerun the {stage} stage") from None


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(fn: Callable[..., dict[str, Any]], *, sections: tuple[str, ...] | Mapping[str, str], paths: tuple[str, ...],
         argv: list[str] | None = None, name: str | None = None) -> None:
    """The stage's command line around ``fn``; ``name`` (default: fn's own) names the module and the flow;
    ``sections``: params sections passed under their own names, or ``{keyword: section}``."""
    name = name or fn.__name__
    keywords = dict(sections) if isinstance(sections, Mapping) else {s: s for s in sections}  # keyword -> section
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{name}", description=(fn.__doc__ or "").strip())
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
    for p in paths:
        parser.add_argument(f"--{p.replace('_', '-')}", dest=p, required=True, metavar="PATH")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ConfigError as exc:
        fail(str(exc))
    kwargs = {k: getattr(params, s) for k, s in keywords.items()} | {p: getattr(args, p) for p in paths}

    try:
        state = run_as_flow(fn, name, kwargs)
    except UserError as exc:  # the run's Prefect server never answered
        fail(str(exc))
    if argv is None:  # a stage process (not a caller in a longer-lived one): it ends right after this
        gc.freeze()  # nothing allocated so far needs collecting at exit: skip the final walk of the heap
    if state.is_failed():
        # A UserError's message is the whole story; anything else has had its traceback logged.
        fail(state.message or f"stage {name} failed")
