"""The outbox: MLflow calls made in order on a background thread, each retried while the
server does not answer, so a tracking server that restarts mid-run costs the curves nothing
and training never waits on it (``Run.buffer``)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from mlflow.exceptions import MlflowException


def _transient(exc: Exception) -> bool:
    """A failure worth retrying: the server unreachable or failing (5xx), not a refusal (4xx)."""
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return True  # connection errors, timeouts, an OSError on the way


class Outbox:
    """MLflow calls made in order on a background thread; a call that fails for a transient
    reason (the server down or restarting) is retried with exponential backoff (0.5 s doubling
    to 30 s) until it succeeds. It never gives up while the run goes on; once closed, it stops
    when the queue is empty or an outage has lasted ``retry_seconds``."""

    def __init__(self, retry_seconds: float) -> None:
        self.retry_seconds = retry_seconds
        self._queue: deque[tuple[str, Callable[[], Any]]] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self.down_since: float | None = None  # monotonic time of the first failure of the current outage
        self.last_error = ""
        self.refused: list[str] = []  # calls the server refused outright (4xx): not retried
        self.outages = 0
        self._thread = threading.Thread(target=self._work, name="aigc-mlflow-outbox", daemon=True)
        self._thread.start()

    def put(self, what: str, call: Callable[[], Any]) -> None:
        with self._cv:
            self._queue.append((what, call))
            self._cv.notify_all()

    def _work(self) -> None:
        delay = 0.5
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                what, call = self._queue[0]
            try:
                call()
            except Exception as exc:  # noqa: BLE001 -- whatever the transport raised, the call waits
                with self._cv:
                    if not _transient(exc):
                        self._queue.popleft()
                        self.refused.append(f"{what}: {getattr(exc, 'message', exc)}")
                        continue
                    now = time.monotonic()
                    if self.down_since is None:
                        self.down_since, self.outages = now, self.outages + 1
                    self.last_error = f"{type(exc).__name__}"
                    if self._closing:
                        left = self.retry_seconds - (now - self.down_since)
                        if left <= 0:
                            return  # given up: the queue keeps what did not arrive
                        self._cv.wait(min(delay, left))
                    else:
                        self._cv.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            with self._cv:
                self._queue.popleft()
                self.down_since, delay = None, 0.5

    def close(self) -> list[str]:
        """Wait for the queue to drain (or an outage to outlast ``retry_seconds``); returns what
        did not arrive."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()  # a waiting retry goes now
        self._thread.join()
        return [what for what, _ in self._queue]


def describe_pending(pending: list[str]) -> str:
    """``["metrics:25", "image:samples", ...]`` -> '25 metric values, 1 sample grid, ...'."""
    counts: Counter[str] = Counter()
    for what in pending:
        kind, _, n = what.partition(":")
        counts[kind] += int(n) if kind == "metrics" else 1
    names = {"metrics": ("metric value", "metric values"), "image": ("image", "images"),
             "artifact": ("artifact", "artifacts"), "tags": ("tag update", "tag updates"),
             "status": ("the final run status", "the final run status")}
    return ", ".join(f"{n:,} {names[k][n != 1]}" if k != "status" else names[k][0] for k, n in counts.items())

