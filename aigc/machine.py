"""What machine a figure was measured on: CPU model and vector flags, PyTorch and its kernels.

Speed on a CPU depends on the instruction set more than on anything in this project (the same
default training ran at 365 img/s on an AVX-512 EPYC and at 106 img/s on an AVX2 one), so every
benchmark file carries :func:`describe` beside its numbers, and the layout probe
(:mod:`aigc.runtime`) caches its choice per :func:`fingerprint`.

Read from ``/proc/cpuinfo`` (Linux) without starting ``lscpu``; elsewhere the fields that
cannot be read are empty rather than guessed.

The kernels that run need not be the CPU's best: oneDNN, ATen and MKL each read a cap from the
environment when torch is imported (:data:`ISA_CAPS`). ``python -m aigc_bench --isa avx2`` sets
them (``aigc_bench/isa.py``) to run the AVX2 code paths on an AVX-512 CPU -- an emulation of the
instruction set only, not of an AVX2 machine's clocks, caches or cores -- and :func:`in_force`
says which kernels a process actually runs, in every report and MLflow run beside the CPU's flags.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any


# the flags that decide which PyTorch/oneDNN kernels run
VECTOR_PREFIXES = ("avx", "fma", "amx")


@lru_cache(maxsize=1)
def usable_cores() -> int:
    """Cores this process may run on (affinity / cgroup cpusets), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu() -> dict[str, Any]:
    """``{"model", "flags", "isa", "logical_cpus"}``: the model name, the vector flags (avx*,
    fma, amx*), and the best instruction-set level among sse4_2 < avx2 < avx512 < avx512+amx."""
    model, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if model and flags:
            break
    model = model or platform.processor() or platform.machine()
    vector = sorted(f for f in flags if f.startswith(VECTOR_PREFIXES))
    if "avx512f" in flags:
        isa = "avx512+amx" if "amx_tile" in flags else "avx512"
    elif "avx2" in flags:
        isa = "avx2"
    elif flags:
        isa = "pre-avx2"
    else:
        isa = "unknown"
    return {"model": model, "flags": vector, "isa": isa, "logical_cpus": os.cpu_count()}


# The CPU's ISA levels, lowest first (cpu()["isa"]).
LEVELS = ("pre-avx2", "avx2", "avx512", "avx512+amx")

# The environment variables that cap the kernels PyTorch's CPU libraries pick, read once when torch
# (oneDNN, ATen's dispatch, MKL) is loaded: set them before torch is imported, or not at all.
# avx512 leaves out AMX (oneDNN's AVX512_CORE: no AMX, BF16 or VNNI kernels); "native" sets none.
ISA_VARS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
ISA_CAPS: dict[str, dict[str, str]] = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "native": {},
}
PRETTY = {"pre-avx2": "pre-AVX2", "avx2": "AVX2", "avx512": "AVX-512", "avx512+amx": "AVX-512+AMX",
          "unknown": "unknown ISA"}


def cap_of(environ: Mapping[str, str] | None = None) -> str:
    """Which cap the environment sets: a name of :data:`ISA_CAPS` (``native``: none of
    :data:`ISA_VARS`), or ``custom`` for any other mix."""
    environ = os.environ if environ is None else environ
    have = {k: environ[k] for k in ISA_VARS if environ.get(k)}
    if environ.get("DNNL_MAX_CPU_ISA") and "ONEDNN_MAX_CPU_ISA" not in have:  # oneDNN's older name
        have["ONEDNN_MAX_CPU_ISA"] = environ["DNNL_MAX_CPU_ISA"]
    for name, want in ISA_CAPS.items():
        if have == want:
            return name
    return "custom"


def _cap_level(library: str, value: str) -> int | None:
    """The index in :data:`LEVELS` a library's cap value lowers it to; None: no lower than the CPU."""
    v = value.upper()
    if library == "aten":  # ATen's levels: DEFAULT < AVX2 < AVX512 (its best: no AMX kernels)
        return {"DEFAULT": 0, "AVX2": 1}.get(v)
    if v.startswith("AVX512_CORE_AMX") or v in ("DEFAULT", "") or v.startswith(("AVX512_E4", "AVX512_E5", "AVX10")):
        return None
    if v.startswith("AVX512"):
        return 2
    if v.startswith("AVX2"):
        return 1
    return 0  # SSE41, AVX, SSE4_2 ...


def in_force() -> dict[str, Any]:
    """The kernels this process runs: ATen's dispatch level (asked of torch), oneDNN's and MKL's
    caps (from the environment, which they read at load; ``default``: none), the cap's name
    (:func:`cap_of`), the effective level (the CPU's, lowered by the lowest cap) and, when that is
    below the CPU's, the caveat every figure of the run must carry."""
    import torch

    c = cpu()["isa"]
    aten = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "default"
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS") or "default"
    level = c
    if c in LEVELS:
        caps = [x for x in (_cap_level("aten", aten), _cap_level("onednn", onednn), _cap_level("mkl", mkl))
                if x is not None]
        level = LEVELS[min([LEVELS.index(c), *caps])]
    emulated = level != c
    return {"cap": cap_of(), "aten": aten, "onednn": onednn, "mkl": mkl, "level": level, "emulated": emulated,
            "caveat": (f"{PRETTY[level]} code paths (ISA capped on {cpu()['model']}, {PRETTY[c]}), not an "
                       f"{PRETTY[level]} machine" if emulated else "")}


def kernels(k: dict[str, Any] | None = None) -> str:
    """The kernels in force (:func:`in_force`) in a few words: ``ATen AVX2, oneDNN AVX2, MKL AVX2``;
    the probe's cache key, the MLflow tag and every report line."""
    k = k or in_force()
    return f"ATen {k['aten']}, oneDNN {k['onednn']}, MKL {k['mkl']}"


def report_suffix() -> str:
    """``""`` for native kernels, else ``_<cap>``: a capped run's reports sit beside the native ones."""
    cap = cap_of()
    return "" if cap == "native" else f"_{cap}"


def onednn_version() -> str | None:
    """The oneDNN (MKL-DNN) version PyTorch was built with, from its build configuration."""
    import torch

    m = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    return m.group(1) if m else None


def describe() -> dict[str, Any]:
    """The machine, as recorded beside every benchmark figure."""
    import torch


    c = cpu()
    kernels = in_force()
    return {
        "cpu_model": c["model"],
        "isa": c["isa"],
        "vector_flags": c["flags"],
        "isa_in_force": kernels,
        "cores_usable": usable_cores(),
        "torch": torch.__version__,
        "onednn": onednn_version(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def fingerprint() -> str:
    """CPU model + ISA level + torch version + the kernels in force (:func:`kernels`): a measured
    choice holds only for the same four, so a capped run never reuses a native answer."""
    import torch

    c = cpu()
    return f"{c['model']} | {c['isa']} | torch {torch.__version__} | {kernels()}"


def tags(d: dict[str, Any] | None = None) -> dict[str, str]:
    """The machine as MLflow tags (``aigc.machine.*``): the CPU and its ISA level, torch and oneDNN
    versions, and the kernels in force -- an ISA cap the user exported shows here, with its caveat."""
    d = d or describe()
    k = d["isa_in_force"]
    out = {"aigc.machine.cpu": d["cpu_model"], "aigc.machine.cpu_isa": d["isa"],
           "aigc.machine.cores_usable": str(d["cores_usable"]), "aigc.machine.torch": d["torch"],
           "aigc.machine.onednn": str(d["onednn"]), "aigc.machine.isa_in_force": k["level"],
           "aigc.machine.kernels": kernels(k),
           "aigc.machine.isa_cap": k["cap"]}
    if k["caveat"]:
        out["aigc.machine.isa_caveat"] = k["caveat"]
    if d.get("cuda"):
        out["aigc.machine.cuda"] = d["cuda"]
    return out


def kernels_line(d: dict[str, Any] | None = None) -> str:
    """``kernels: ATen AVX512, oneDNN default, MKL default`` (+ the caveat of a capped run)."""
    k = (d or describe())["isa_in_force"]
    return f"kernels: {kernels(k)}" + (f" -- {k['caveat']}" if k["caveat"] else "")


def one_line(d: dict[str, Any] | None = None) -> str:
    """``Intel(R) Xeon(R) Processor (avx512+amx, 2 cores), torch 2.13.0, oneDNN 3.12.0, load 0.4; kernels: ...``."""
    d = d or describe()
    return (f"{d['cpu_model']} ({d['isa']}, {d['cores_usable']} cores), torch {d['torch']}, "
            f"oneDNN {d['onednn']}, load {d['load_average'][0]:.1f}; {kernels_line(d)}")
