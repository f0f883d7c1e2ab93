"""Where the work runs: the device, and how many CPU threads the machine can really give.

On a shared machine another process may hold a core for minutes. A 2-thread PyTorch step
then waits on the slower thread at every op and runs 3-8x slower than usual, slower than
one thread alone. So the thread count follows the cores that are *free*, measured, not
``os.cpu_count()``. Time the hypervisor gives to other virtual machines (``steal``) is not a
process on this machine holding a core, and does not count as one.

What is best for the machine itself -- NHWC (channels_last) or NCHW, all cores or one (two
vCPUs may be hyperthreads of one core) -- differs between CPUs: channels_last measured 1.07x
on an AVX-512 Xeon and 0.89x on an AVX2 EPYC. :func:`probe` times the real training step in
each setting once per machine (CPU model + ISA + torch version + the kernels in force, i.e. ATen's
capability and oneDNN's/MKL's ISA caps, :mod:`aigc.machine`) and
caches the answer in ``~/.cache/aigc/probe.json`` (``$AIGC_CACHE_DIR``), outside the
repository: it is a fact about the machine, not about the project.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from aigc.errors import UserError
from aigc.machine import fingerprint, in_force, usable_cores  # the machine itself; runtime decides how to use it


def resolve_device(name: str, key: str = "runtime.device") -> torch.device:
    """``auto`` -> CUDA when present, else CPU. Asking for CUDA without one is an error naming ``key``."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key} = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


class CoreWatch:
    """How many cores *other* processes keep busy, from system-wide minus our own CPU time."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._mark()

    def _mark(self) -> None:
        cpu = psutil.cpu_times()
        # Busy = user + nice + system + irq + softirq. Not steal (another VM on the host, not a
        # process here), not guest/guest_nice (already inside user and nice), not idle/iowait.
        self._busy = sum(getattr(cpu, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq"))
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
    """``runtime.threads``: an int is used as is; ``auto`` watches the machine for ``probe_s``."""
    if isinstance(setting, int):
        return setting
    watch = CoreWatch()
    time.sleep(probe_s)
    return free_threads(watch.others_busy())


# --- the per-machine probe: memory layout and thread count, measured on the real step ----------

PROBE_FORMAT = "aigc.probe/1"


def cache_dir() -> Path:
    """``$AIGC_CACHE_DIR``, else ``$XDG_CACHE_HOME/aigc``, else ``~/.cache/aigc``."""
    if os.environ.get("AIGC_CACHE_DIR"):
        return Path(os.environ["AIGC_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aigc"


@dataclass
class ProbeResult:
    """What the probe chose for one (machine, workload) and the speeds it measured (img/s)."""

    channels_last: bool
    threads: int  # the best thread count on an otherwise idle machine (auto never exceeds the free cores)
    speeds: dict[str, float] = field(default_factory=dict)  # "nhwc/2" -> img/s, ...
    cached: bool = False
    seconds: float = 0.0  # what the probe cost (0 when read from the cache)
    note: str = ""  # why the answer was not cached, if it was not

    @property
    def channels_last_ratio(self) -> float | None:
        """img/s with channels_last over img/s without, at the chosen thread count."""
        for th in sorted({int(k.split("/")[1]) for k in self.speeds}, reverse=True):
            a, b = self.speeds.get(f"nhwc/{th}"), self.speeds.get(f"nchw/{th}")
            if a and b:
                return round(a / b, 3)
        return None

    def describe(self) -> str:
        ratio = self.channels_last_ratio
        if not self.speeds:
            return f"layout {'channels_last' if self.channels_last else 'NCHW'}, {self.note}"
        how = "cached" if self.cached else f"measured in {self.seconds:.1f} s"
        return (f"layout {'channels_last' if self.channels_last else 'NCHW'}"
                + (f" (channels_last {ratio:.2f}x NCHW)" if ratio else "")
                + f", best at {self.threads} thread(s); {how}: "
                + ", ".join(f"{k} {v:.0f}" for k, v in sorted(self.speeds.items())) + " img/s"
                + (f" ({self.note})" if self.note else ""))


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no cache yet, or a broken one: measure again
    return data if isinstance(data, dict) and data.get("format") == PROBE_FORMAT else {}


def unmeasured(why: str, layouts: tuple[bool, ...], cores: int) -> ProbeResult:
    """The layout when the probe cannot measure: channels_last on AVX-512 kernels (measured 1.07x
    there), NCHW elsewhere (0.89x on an AVX2 EPYC); all cores."""
    level = in_force()["level"]  # the kernels that run: an AVX2 cap on an AVX-512 CPU counts as AVX2
    nhwc = True in layouts and level.startswith("avx512")
    return ProbeResult(nhwc, cores, note=f"not measured: {why}; {'channels_last' if nhwc else 'NCHW'} "
                                         f"by the kernels' ISA ({level}) (not cached: the next run measures)")


def probe(workload: str, measure: Callable[[bool, int], float], cores: int | None = None,
          layouts: tuple[bool, ...] = (True, False)) -> ProbeResult:
    """The fastest (channels_last, threads) for ``workload`` on this machine.

    ``measure(channels_last, threads)`` returns images/s of the real step. Each layout in
    ``layouts`` is timed at the cores free now; on an idle multi-core machine the best layout is
    then timed at one thread as well (two vCPUs may share one physical core). The answer is cached
    per machine fingerprint and workload whatever the load, so a seed gives the same run on this
    machine from then on; measured beside a busy neighbour it says so. Delete the file to measure again.
    """
    from aigc.io import write_json

    cores = cores or usable_cores()
    key = f"{fingerprint()} | {workload} | cores {cores}"
    path = cache_dir() / "probe.json"
    cache = _read_cache(path)
    hit = cache.get("entries", {}).get(key)
    if hit:
        return ProbeResult(bool(hit["channels_last"]), int(hit["threads"]), dict(hit["speeds"]), cached=True,
                           note=hit.get("note", ""))
    t0 = time.perf_counter()
    free = choose_threads("auto")
    watch = CoreWatch()
    # The layouts are compared at the cores free now (a neighbour holding a core does not slow a
    # step that does not use it); one thread against all cores only on an idle machine.
    speeds = {(cl, free): measure(cl, free) for cl in layouts}
    layout = max(speeds, key=speeds.get)[0]
    idle = free == cores
    if idle and cores > 1:
        speeds[(layout, 1)] = measure(layout, 1)
        idle = watch.others_busy() < 0.5
    fastest = max(speeds, key=speeds.get)
    # Cached in every case, so "auto" gives one answer per machine (same seed, same run) until the
    # file is deleted; the thread count is a finding only when measured idle, else "all cores".
    result = ProbeResult(layout, fastest[1] if idle else cores,
                         {f"{'nhwc' if cl else 'nchw'}/{th}": round(v, 1) for (cl, th), v in speeds.items()},
                         seconds=round(time.perf_counter() - t0, 2),
                         note="" if idle else f"measured beside a busy neighbour at {free} thread(s); delete "
                                              f"{path} to measure again on an idle machine")
    entry = {k: v for k, v in asdict(result).items() if k in ("channels_last", "threads", "speeds", "note")}
    cache = {"format": PROBE_FORMAT, "entries": cache.get("entries", {}) | {key: entry}}
    try:
        write_json(path, cache)
    except (OSError, UserError):  # a read-only or full home: the next run measures again
        result.note = f"not cached: {path} could not be written"
    return result
