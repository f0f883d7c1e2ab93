"""Thread choice follows the cores other processes leave free; layout and threads are probed per machine."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from aigc import runtime
from aigc.config import RuntimeConfig, TrainConfig
from aigc.models import NetConfig
from aigc.runtime import CoreWatch, choose_threads, free_threads
from aigc.training import train_gan


@pytest.mark.parametrize("others, cores, expected", [(0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (1.0, 2, 1),
                                                     (2.0, 2, 1), (1.2, 8, 7), (0.0, 1, 1)])
def test_free_threads(others: float, cores: int, expected: int):
    assert free_threads(others, cores) == expected


def test_a_number_is_used_as_given():
    assert choose_threads(3) == 3


def test_a_busy_neighbour_is_seen():
    watch = CoreWatch()
    busy = subprocess.Popen([sys.executable, "-c", "import time; t = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(1.5)
        assert watch.others_busy() >= 0.5
    finally:
        busy.kill()
        busy.wait()


# --- the per-machine speed probe: layout and threads measured on the real step, cached ----------

def test_probe_picks_the_faster_setting_and_caches_it_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "choose_threads", lambda setting: 2)  # an idle 2-core machine
    speeds = {(True, 2): 300.0, (False, 2): 400.0, (False, 1): 250.0}
    calls = []

    def measure(cl, th):
        calls.append((cl, th))
        return speeds[(cl, th)]

    got = runtime.probe("w", measure, cores=2)
    assert (got.channels_last, got.threads, got.cached) == (False, 2, False)
    assert got.channels_last_ratio == pytest.approx(0.75)
    assert sorted(calls) == sorted(speeds)  # every layout at all cores, the best one at 1 thread
    again = runtime.probe("w", lambda cl, th: pytest.fail("a cached answer is not measured again"), cores=2)
    assert (again.channels_last, again.threads, again.cached) == (False, 2, True)
    assert "cached" in again.describe() and "0.75x" in again.describe()
    other = runtime.probe("another workload", lambda cl, th: 100.0 + cl + th, cores=2)
    assert not other.cached and (other.channels_last, other.threads) == (True, 2)


def test_probe_beside_a_busy_neighbour_compares_layouts_on_the_free_core_and_keeps_the_answer(monkeypatch, tmp_path):
    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "choose_threads", lambda setting: 1)  # a neighbour holds one of two cores
    calls = []
    got = runtime.probe("w", lambda cl, th: calls.append((cl, th)) or (200.0 if cl else 100.0), cores=2)
    assert calls == [(True, 1), (False, 1)]  # both layouts at the free core; threads not judged
    assert got.channels_last and got.threads == 2 and "busy neighbour" in got.describe()
    again = runtime.probe("w", lambda cl, th: pytest.fail("cached: the same answer, the same run"), cores=2)
    assert again.cached and again.channels_last and "busy neighbour" in again.note


def test_a_capped_run_never_reuses_the_native_answer_nor_the_other_way_round(monkeypatch, tmp_path):
    from aigc import machine

    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "choose_threads", lambda setting: 2)
    for k in machine.ISA_VARS:
        monkeypatch.delenv(k, raising=False)
    assert f"ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN default" in machine.fingerprint()
    native = runtime.probe("w", lambda cl, th: 300.0 if cl else 200.0, cores=2)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # e.g. --isa avx2: oneDNN's AVX2 kernels
    capped = runtime.probe("w", lambda cl, th: 100.0 if cl else 200.0, cores=2)
    assert not capped.cached and not capped.channels_last and native.channels_last
    assert len(json.loads((tmp_path / "probe.json").read_text())["entries"]) == 2
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    again = runtime.probe("w", lambda cl, th: pytest.fail("the native answer is cached"), cores=2)
    assert again.cached and again.channels_last


def test_a_broken_cache_is_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "choose_threads", lambda setting: 1)
    (tmp_path / "probe.json").write_text("{not json")
    got = runtime.probe("w", lambda cl, th: 10.0 * (1 + cl), cores=1)
    assert got.channels_last and json.loads((tmp_path / "probe.json").read_text())["format"] == runtime.PROBE_FORMAT


def test_training_with_auto_layout_reports_what_it_chose(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path))
    images = torch.rand(96, 1, 8, 8) * 2 - 1
    cfg, rt = TrainConfig(epochs=1, batch_size=16, grid_size=4), RuntimeConfig(log_every=3)
    assert rt.channels_last == "auto"
    result = train_gan(cfg, NetConfig("dcgan", 8, 1, 8, 8, g_widths=(16, 8), d_widths=(8, 16), kernel=4), images,
                       seed=0, progress=False, runtime=rt)
    assert result.probe is not None and result.channels_last == result.probe.channels_last
    explicit = train_gan(cfg, NetConfig("dcgan", 8, 1, 8, 8, g_widths=(16, 8), d_widths=(8, 16), kernel=4), images,
                         seed=0, progress=False, runtime=rt.model_copy(update={"channels_last": False, "threads": 1}))
    assert explicit.probe is None and not explicit.channels_last and explicit.threads == 1
