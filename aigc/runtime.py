"""Where the work runs: the device, and how many CPU threads the machine can really give.

On a shared machine another process may hold a core for minutes. A 2-thread PyTorch step
then waits on the slower thread at every op and runs 3-8x slower than usual, slower than
one thread alone. So the thread count follows the cores that are *free*, measured, not
``os.cpu_count()``.
"""

from __future__ import annotations

import os
import time

import psutil
import torch

from aigc.errors import UserError


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when present, else CPU. Asking for CUDA without one is an error naming ``key``."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key} = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def usable_cores() -> int:
    """Cores this process may run on (affinity / cgroup cpusets), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class CoreWatch:
    """How many cores *other* processes keep busy, from system-wide minus our own CPU time."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._mark()

    def _mark(self) -> None:
        cpu = psutil.cpu_times()
        self._busy = sum(cpu) - cpu.idle - getattr(cpu, "iowait", 0.0)
        own = self._me.cpu_times()
        self._own = own.user + own.system + own.children_user + own.children_system
        self._t = time.monotonic()

    def others_busy(self) -> float:
        """Cores busy with other processes since the last call (or since construction)."""
        busy0, own0, t0 = self._busy, self._own, self._t
        self._mark()
        wall = max(self._t - t0, 1e-6)
        return max(0.0, ((self._busy - busy0) - (self._own - own0)) / wall)


def free_threads(others_busy: float, cores: int | None = None) -> int:
    """Threads to use: the usable cores minus those other processes hold (a core counts as
    held when it is more than half busy), at least one."""
    cores = cores or usable_cores()
    return max(1, cores - int(others_busy + 0.5))


def choose_threads(setting: str | int, probe_s: float = 0.5) -> int:
    """``train.threads``: an int is used as is; ``auto`` watches the machine for ``probe_s``."""
    if isinstance(setting, int):
        return setting
    watch = CoreWatch()
    time.sleep(probe_s)
    return free_threads(watch.others_busy())
