"""The ISA caps: which kernels a process runs, said in every report; a cap above the CPU refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from aigc import machine
from aigc_bench import isa
from aigc.errors import UserError
from tests.conftest import ROOT

AVX2_CPU = {"model": "AMD EPYC 7B13", "flags": ["avx", "avx2", "fma"], "isa": "avx2", "logical_cpus": 2}
SPR_CPU = {"model": "Intel(R) Xeon(R) Processor", "flags": ["amx_tile", "avx2", "avx512f"], "isa": "avx512+amx",
           "logical_cpus": 2}


def test_a_cap_gives_its_variables_and_never_one_above_the_cpu():
    assert isa.isa_cap_env("avx2", "avx512+amx") == {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                                                        "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert isa.isa_cap_env("avx512", "avx512+amx")["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"  # no AMX
    assert isa.isa_cap_env("native", "avx2") == {}
    with pytest.raises(UserError, match=r"--isa avx512: .* has avx2, not avx512; .* use --isa native or --isa avx2"):
        isa.isa_cap_env("avx512", "avx2")
    with pytest.raises(UserError, match="has pre-avx2, not avx2"):
        isa.isa_cap_env("avx2", "pre-avx2")
    with pytest.raises(UserError, match="'sse' is not a known cap"):
        isa.isa_cap_env("sse", "avx2")


def test_which_cap_the_environment_sets_and_where_its_reports_go(monkeypatch):
    assert machine.cap_of({}) == "native" and machine.cap_of({"PATH": "/bin"}) == "native"
    assert machine.cap_of(machine.ISA_CAPS["avx2"]) == "avx2"
    assert machine.cap_of({"ONEDNN_MAX_CPU_ISA": "AVX2"}) == "custom"  # one library capped, not the set
    assert machine.cap_of({"DNNL_MAX_CPU_ISA": "AVX2"}) == "custom"  # oneDNN's older name caps it too
    for k in machine.ISA_VARS:
        monkeypatch.delenv(k, raising=False)
    assert machine.report_suffix() == ""  # native figures keep their names
    for k, v in machine.ISA_CAPS["avx2"].items():
        monkeypatch.setenv(k, v)
    assert machine.report_suffix() == "_avx2"


def test_the_effective_level_is_the_cpus_lowered_by_the_lowest_cap(monkeypatch):
    monkeypatch.setattr(machine, "cpu", lambda: SPR_CPU)
    for k in machine.ISA_VARS:
        monkeypatch.delenv(k, raising=False)
    native = machine.in_force()
    if native["aten"] == "AVX512":  # this process's ATen runs its best kernels: nothing capped
        assert native["level"] == "avx512+amx" and not native["emulated"] and native["caveat"] == ""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # what a user may export before starting a stage
    capped = machine.in_force()
    assert (capped["cap"], capped["onednn"], capped["level"], capped["emulated"]) == ("custom", "AVX2", "avx2", True)
    assert capped["caveat"] == "AVX2 code paths (ISA capped on Intel(R) Xeon(R) Processor, AVX-512+AMX), not an AVX2 machine"
    tags = machine.tags()
    assert tags["aigc.machine.isa_in_force"] == "avx2" and tags["aigc.machine.isa_caveat"] == capped["caveat"]
    assert "oneDNN AVX2" in tags["aigc.machine.kernels"] and "oneDNN AVX2" in machine.one_line()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")  # a "cap" at the CPU's own level caps nothing
    assert machine.in_force()["level"] == ("avx512+amx" if native["aten"] == "AVX512" else native["level"])


@pytest.mark.parametrize("module", ["aigc_bench.__main__", "aigc_bench.profile_step", "aigc_bench.isa"])
def test_a_cap_the_cpu_lacks_is_one_error_line(module, monkeypatch):
    import importlib

    monkeypatch.setattr(machine, "cpu", lambda: AVX2_CPU)
    monkeypatch.setattr(sys, "argv", [module, "--isa", "avx512"])
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main()
    msg = str(e.value.code)
    assert msg.startswith("error: --isa avx512: this CPU (AMD EPYC 7B13) has avx2, not avx512") and "\n" not in msg


@pytest.mark.skipif(machine.cpu()["isa"] not in ("avx2", "avx512", "avx512+amx"), reason="the CPU has no AVX2")
def test_a_capped_command_starts_again_with_torch_under_the_cap():
    env = {k: v for k, v in os.environ.items() if k not in machine.ISA_VARS}
    out = subprocess.run([sys.executable, "-m", "aigc_bench.isa", "--isa", "avx2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    first, _, rest = out.partition("\n")
    assert "kernels: ATen AVX2, oneDNN AVX2, MKL AVX2" in first
    k = json.loads(rest)["isa_in_force"]
    assert (k["cap"], k["aten"]) == ("avx2", "AVX2")  # asked of torch in the new process, not read from the env
    assert k["emulated"] == (machine.cpu()["isa"] != "avx2")
