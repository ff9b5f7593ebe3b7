"""The queue of ``dpokit serve``: one worker thread runs the jobs (requests) one at a time, first come first
served, at most ``max_queue`` waiting; a job whose client went away is skipped or stopped at its next token."""

from __future__ import annotations

import itertools
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpokit.errors import DpokitError
from dpokit.serve import MAX_QUEUE

Event = dict[str, Any]
Emit = Callable[[Event], None]


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One request's work. ``work(emit, cancelled)`` runs on the worker thread; ``emit`` must not block."""

    work: Callable[[Emit, threading.Event], None]
    emit: Emit
    cancelled: threading.Event = field(default_factory=threading.Event)
    ticket: int = -1
    """Order of arrival (0, 1, ...), given when the job is queued."""


class Worker:
    """One thread runs the jobs one at a time, in order of arrival.

    Generation is the one thing here that needs much memory, so it never runs twice at once; waiting requests
    cost nothing but a slot in a bounded deque. A job whose client went away is skipped, or stopped at its next
    token.
    """

    def __init__(self, max_queue: int = MAX_QUEUE) -> None:
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._served = 0
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dpokit-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job (its ``queued`` event is emitted here). Raises :class:`QueueFull`."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            # Waiting means behind a running job: an idle worker takes a job at once, also with max_queue 0.
            if len(self._waiting) + self._busy > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting behind the running one already (at "
                                f"most {self.max_queue}); try again in a moment")
            job.ticket = next(self._tickets)
            job.emit({"type": "queued", "ticket": job.ticket, "ahead": len(self._waiting) + self._busy})
            self._waiting.append(job)
            self._cond.notify()

    def close(self, timeout: float | None = 5.0) -> None:
        """Refuse new jobs, end the waiting ones with an error, and let the running one finish."""
        with self._cond:
            self._closed = True
            for job in self._waiting:
                job.emit({"type": "error", "message": "the server stopped"})
            self._waiting.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    def _next(self) -> tuple[Job, int] | None:
        with self._cond:
            while True:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    continue
                served, self._served, self._busy = self._served, self._served + 1, True
                for ahead, other in enumerate(self._waiting, start=1):
                    other.emit({"type": "queued", "ticket": other.ticket, "ahead": ahead})
                return job, served

    def _loop(self) -> None:
        while (item := self._next()) is not None:
            self._run(*item)
            del item  # while the queue is empty, no finished job (its request, its events) stays referenced

    def _run(self, job: Job, served: int) -> None:
        started = time.perf_counter()
        job.emit({"type": "start", "ticket": job.ticket, "served": served})
        try:
            job.work(job.emit, job.cancelled)
            job.emit({"type": "done", "ticket": job.ticket, "served": served,
                      "elapsed_s": round(time.perf_counter() - started, 3)})
        except DpokitError as exc:
            job.emit({"type": "error", "message": str(exc)})
        except Exception as exc:  # a bug must end this request, not the server
            traceback.print_exc(file=sys.stderr)
            job.emit({"type": "error", "message": f"internal error ({type(exc).__name__}); see the server log"})
        finally:
            with self._cond:
                self._busy = False
