"""A sink for named training scalars (stylegan2-ada's ``training_stats.report`` idea).

The loop, the losses and the penalties call ``stats.report(name, value)`` with whatever they
want seen -- losses, penalties, D's outputs, the EMA decay, later a privacy budget -- and never
know where it goes. Values stay on the device; ``collect()`` copies one window of steps to the
host in a single transfer, so a CUDA step never waits on a host sync. What reads the rows (the
recorder, the DVC plot file, MLflow) takes whatever names appear, with no fixed key list.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class Stats:
    """Per-step named scalars, accumulated on the device until ``collect``."""

    def __init__(self) -> None:
        self._pending: dict[str, list[torch.Tensor | float]] = {}
        self._steps: list[tuple[int, list[str], list[torch.Tensor | float]]] = []

    def report(self, name: str, value: torch.Tensor | float) -> None:
        """Record ``value`` (a tensor, averaged to one number, or a float) under ``name`` for the
        current step. Reporting a name twice in a step averages the two."""
        if isinstance(value, torch.Tensor):
            value = value.detach().float().mean()
        self._pending.setdefault(name, []).append(value)

    def end_step(self, step: int) -> None:
        """Close the current step: its reports become one row, numbered ``step``."""
        names, values = [], []
        for name, vals in self._pending.items():
            if all(isinstance(v, torch.Tensor) for v in vals):
                value = vals[0] if len(vals) == 1 else torch.stack(vals).mean()  # type: ignore[arg-type]
            else:
                value = sum(float(v) for v in vals) / len(vals)
            names.append(name)
            values.append(value)
        self._steps.append((step, names, values))
        self._pending = {}

    def __len__(self) -> int:
        return len(self._steps)

    def collect(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[tuple[int, dict[str, float]]]:
        """The closed steps since the last call as ``(step, {name: value})``, in order; one
        device-to-host copy for all of them. ``reduce`` (e.g. a mean across data-parallel ranks)
        is applied to the stacked values first, as one collective call."""
        tensors = [v for _, _, vals in self._steps for v in vals if isinstance(v, torch.Tensor)]
        stacked = torch.stack(tensors) if tensors else None
        if stacked is not None and reduce is not None:
            stacked = reduce(stacked)
        host = iter(stacked.cpu().tolist()) if stacked is not None else iter(())
        rows = []
        for step, names, vals in self._steps:
            rows.append((step, {n: (next(host) if isinstance(v, torch.Tensor) else float(v))
                                for n, v in zip(names, vals)}))
        self._steps = []
        return rows
