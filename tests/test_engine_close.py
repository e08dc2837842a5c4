"""The engine waits for a slow analysis as long as it makes progress, and gives up on a stuck one."""
from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

from stemlive.live.engine import BlockEngine, EngineStats


def _engine_like(work) -> SimpleNamespace:
    eng = SimpleNamespace(stats=EngineStats(), _queue=queue.Queue())
    eng._worker = threading.Thread(target=work, args=(eng,), daemon=True)
    eng._worker.start()
    return eng


def test_a_slow_analysis_that_progresses_is_waited_for_beyond_the_timeout():
    def slow(eng):  # a block stored every 0.3 s for 1.5 s in all: three times the 0.5 s idle timeout
        for k in range(5):
            time.sleep(0.3)
            eng.stats.stored_at[(k, 0)] = time.perf_counter()

    eng = _engine_like(slow)
    t0 = time.perf_counter()
    assert BlockEngine._join_while_progressing(eng, 0.5) is True
    assert time.perf_counter() - t0 >= 1.4 and len(eng.stats.stored_at) == 5


def test_a_stuck_analysis_is_given_up_after_the_idle_timeout():
    release = threading.Event()
    eng = _engine_like(lambda eng: release.wait(10))
    t0 = time.perf_counter()
    assert BlockEngine._join_while_progressing(eng, 0.5) is False
    assert 0.4 <= time.perf_counter() - t0 < 3
    release.set()
