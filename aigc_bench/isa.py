"""ISA caps for the benchmarks: run PyTorch's CPU kernels (oneDNN, ATen, MKL) capped at an
instruction set, e.g. the AVX2 code paths on an AVX-512 CPU -- an emulation of the instruction set
only, not of an AVX2 machine's clocks, caches or cores.

    python -m aigc_bench --isa avx2
    python -m aigc_bench.isa --isa avx2      # the machine and the kernels that run, as JSON

The caps are read when torch is imported, so a capped run re-executes itself under them
(:func:`exec_under_cap`). What the stages need of the machine (its CPU, the kernels in force, the
MLflow tags) stays in ``aigc/machine.py``; this command-line side lives here, so a change to it
retrains nothing (``aigc/machine.py`` is a dependency of the train stage).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from aigc.errors import UserError
from aigc import machine
from aigc.machine import ISA_CAPS, ISA_VARS, LEVELS, cap_of


def isa_cap_env(cap: str, cpu_isa: str | None = None) -> dict[str, str]:
    """The environment variables of the cap ``cap`` (:data:`ISA_CAPS`), checked against the CPU:
    a cap above what the CPU has (avx512 on an AVX2 machine) is a :class:`UserError`, not a silent
    fall-back to other kernels."""
    if cap not in ISA_CAPS:
        raise UserError(f"--isa {cap!r} is not a known cap; use one of {', '.join(ISA_CAPS)}")
    cpu_isa = cpu_isa or machine.cpu()["isa"]
    need = None if cap == "native" else cap  # the CPU level a cap needs: its own name
    if need and (cpu_isa not in LEVELS or LEVELS.index(cpu_isa) < LEVELS.index(need)):
        raise UserError(f"--isa {cap}: this CPU ({machine.cpu()['model']}) has {cpu_isa}, not {need}; a cap can only "
                        f"lower the instruction set: use --isa native"
                        + (" or --isa avx2" if cpu_isa in LEVELS[1:] else ""))
    return dict(ISA_CAPS[cap])


def exec_under_cap(cap: str, module: str, argv: Sequence[str]) -> None:
    """Make sure this process runs under ``cap``: return when the environment already sets it,
    else replace the process by ``python -m module argv...`` with the cap's variables set (and the
    other ones of :data:`ISA_VARS` removed), so torch is imported under it and every process it
    starts inherits it. Raises :class:`UserError` for a cap the CPU does not have."""
    want = isa_cap_env(cap)
    if cap_of() == cap:
        return
    # DNNL_MAX_CPU_ISA: oneDNN's older name of ONEDNN_MAX_CPU_ISA, which would cap a "native" run.
    env = {k: v for k, v in os.environ.items() if k not in (*ISA_VARS, "DNNL_MAX_CPU_ISA")} | want
    _execve([sys.executable, "-m", module, *argv], env)


def add_isa_argument(ap: Any) -> None:
    """``--isa {avx2,avx512,native}`` on an argparse parser (the benchmarks' and this module's)."""
    ap.add_argument("--isa", choices=tuple(ISA_CAPS), default=None,
                    help="cap PyTorch's CPU kernels (oneDNN, ATen, MKL) at this instruction set, e.g. avx2 on an "
                         "AVX-512 CPU: an emulation of the ISA only, not of an AVX2 machine; a benchmark's reports "
                         "get the suffix _<isa> (default: the kernels the environment gives)")


def under_cap(isa: str | None, module: str, argv: Sequence[str] | None = None) -> None:
    """The command-line edge of :func:`exec_under_cap`: nothing for ``None``, a cap the CPU does
    not have is one ``error:`` line and exit status 1. Call it before anything imports torch."""
    if isa is None:
        return
    try:
        exec_under_cap(isa, module, sys.argv[1:] if argv is None else argv)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


def _execve(cmd: list[str], env: dict[str, str]) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m aigc_bench.isa [--isa avx2]``: the machine and the kernels that run, as JSON."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m aigc_bench.isa", description=main.__doc__)
    add_isa_argument(ap)
    args = ap.parse_args(argv)
    under_cap(args.isa, "aigc_bench.isa", argv)
    d = machine.describe()
    print(machine.one_line(d))
    print(json.dumps(d, indent=2))


if __name__ == "__main__":
    main()
