"""Thread choice follows the cores other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from aigc.runtime import CoreWatch, choose_threads, free_threads


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
