"""SIGTERM or SIGINT during training: finish the step in flight, save a checkpoint, stop.

A cluster scheduler (Slurm, Kubernetes) preempts a job with SIGTERM and kills it a grace period later; a user
stops a run with Ctrl-C (SIGINT). While ``train.loop`` runs, the first such signal only sets a flag: the loop
finishes the step in flight, saves the same atomic checkpoint ``train.save_every`` writes and raises
``Preempted`` (the CLI prints where it saved and the command that resumes, and exits 128 + the signal's
number: 143 for SIGTERM, 130 for SIGINT). A second signal ends the process at once with the same code, saving
nothing; ``--resume`` then continues from the newest complete checkpoint, as after SIGKILL.

Under torchrun every rank must stop after the same step and save together, yet a signal may reach the ranks at
different moments, or only one of them: the ranks sum their flags after every step (``Dist.sum``, a few
bytes), so all stop after the first step by whose end any rank was signalled. A terminal's Ctrl-C, or a
scheduler's SIGTERM to the job's process group, reaches every worker *and* torchrun, which forwards it to the
workers again: under torchrun a repeat within ``REPEAT_S`` seconds of the first signal is that same signal,
not a second one. torchrun kills workers that have not exited 30 s after it forwarded a signal, so a
checkpoint must be written within that time there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpokit.errors import Preempted
from dpokit.training.distributed import Dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_S = 2.0


def _say(message: str) -> None:
    # os.write, not print: a signal arriving while the main thread prints would make print re-enter itself.
    os.write(2, f"dpokit: {message}\n".encode())


class Preemption:
    """The stop request of one process: which signal came first, and when. ``every``: the run may stop only
    after a step that is a multiple of it (semi-online DPO checkpoints only at generator refreshes)."""

    def __init__(self, dist: Dist, every: int = 1):
        self.dist, self.every = dist, every
        self.signum: int | None = None
        self.at = 0.0

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
            when = (f"the next step that is a multiple of {self.every}" if self.every > 1
                    else "the step in flight")
            _say(f"{name} received: stopping after {when}, with a checkpoint (a second signal stops at once, "
                 "saving nothing)")
            return
        if self.dist.active and time.monotonic() - self.at < REPEAT_S:
            return  # the same signal, forwarded by torchrun
        _say(f"second signal ({name}): stopping now without saving; --resume continues from the newest "
             "complete checkpoint")
        os._exit(128 + signum)

    def requested(self, step: int) -> int | None:
        """The signal after which every rank stops now, after ``step``, or None; the same answer on every rank
        (a collective under torchrun: every rank calls it after the same step)."""
        if step % self.every:
            return None
        flags = [float(self.signum == s) for s in SIGNALS]
        if self.dist.active:
            flags = self.dist.sum(flags)
        return next((int(s) for s, flag in zip(SIGNALS, flags) if flag), None)

    def stopped(self, signum: int, run_dir: Path, step: int, total: int) -> Preempted:
        """The error that ends the run once step ``step``'s checkpoint is saved."""
        # No rank exits (torchrun would then kill the others) before the checkpoint is whole.
        self.dist.barrier()
        path = run_dir / "checkpoints" / f"step-{step}"
        return Preempted(f"stopped by {signal.Signals(signum).name} after step {step} of {total}; checkpoint "
                         f"saved: {path}", signum, str(path))


@contextlib.contextmanager
def stop_on_signals(dist: Dist, every: int = 1) -> Iterator[Preemption]:
    """SIGTERM and SIGINT set the returned ``Preemption``'s flag while the block runs; the handlers before it
    come back after. Outside the main thread (which alone receives signals in Python) nothing is installed."""
    preemption = Preemption(dist, every)
    previous = {}
    try:
        for signum in SIGNALS:
            previous[signum] = signal.signal(signum, preemption.handle)
    except ValueError:
        pass  # not the main thread
    try:
        yield preemption
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
