"""What machine a figure was measured on: CPU model and vector flags, PyTorch and its kernels.

Speed on a CPU depends on the instruction set more than on anything in this project (the same
default training ran at 365 img/s on an AVX-512 EPYC and at 106 img/s on an AVX2 one), so every
benchmark file carries :func:`describe` beside its numbers, and the layout probe
(:mod:`aigc.runtime`) caches its choice per :func:`fingerprint`.

Read from ``/proc/cpuinfo`` (Linux) without starting ``lscpu``; elsewhere the fields that
cannot be read are empty rather than guessed.
"""

from __future__ import annotations

import os
import platform
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

# the flags that decide which PyTorch/oneDNN kernels run
VECTOR_PREFIXES = ("avx", "fma", "amx")


@lru_cache(maxsize=1)
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


def onednn_version() -> str | None:
    """The oneDNN (MKL-DNN) version PyTorch was built with, from its build configuration."""
    import torch

    m = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    return m.group(1) if m else None


def describe() -> dict[str, Any]:
    """The machine, as recorded beside every benchmark figure."""
    import torch

    from aigc.runtime import usable_cores

    c = cpu()
    return {
        "cpu_model": c["model"],
        "isa": c["isa"],
        "vector_flags": c["flags"],
        "cores_usable": usable_cores(),
        "torch": torch.__version__,
        "onednn": onednn_version(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def fingerprint() -> str:
    """CPU model + ISA level + torch version: a measured choice holds only for the same three."""
    import torch

    c = cpu()
    return f"{c['model']} | {c['isa']} | torch {torch.__version__}"


def one_line(d: dict[str, Any] | None = None) -> str:
    """``Intel(R) Xeon(R) Processor (avx512+amx, 2 cores), torch 2.13.0, oneDNN 3.12.0, load 0.4``."""
    d = d or describe()
    return (f"{d['cpu_model']} ({d['isa']}, {d['cores_usable']} cores), torch {d['torch']}, "
            f"oneDNN {d['onednn']}, load {d['load_average'][0]:.1f}")
