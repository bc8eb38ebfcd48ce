"""A hang watchdog per rank: a rank on which no step completes in time ends the job, with evidence.

A rank stuck in a collective (a dead peer, a bad NIC), a data read that never returns or a
deadlock otherwise waits for the collective's own timeout (`engine.timeout_s`, 30 minutes by
default), or forever, and burns the allocation. A daemon thread per rank watches a heartbeat
the training loop sets when a step completes. When none comes within the limit it writes
every thread's stack of this rank to `<output_dir>/hang/rank_<R>_step_<N>.txt`, logs one line
naming the rank, the step and the phase the loop was in, and exits the process with
HANG_EXIT (4), which the SLURM launcher requeues like a preemption (the run resumes from its
last checkpoint). The main thread is stuck, so the exit is `os._exit` after flushing.

The loop marks its phase by assigning a string (no host sync, no allocation per step).
Limits: `train.hang_timeout_s` if set, else STEP_FACTOR x the slowest of the recent steps,
at least FLOOR_S. What legitimately runs long (the first step of every new loader: compile, an
epoch's start, its workers and first batch, a rollback; checkpoints; monitors) gets at least
LONG_PHASE_S, and the clock restarts when it begins and ends, so its time is never counted
against a step. Every limit stays below COLLECTIVE_MARGIN x `engine.timeout_s`: the peers of a
hung rank wait for it in a collective, and if that collective's own timeout came first they
would fail with no stacks and an exit status the launcher does not requeue.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, FrozenSet, Iterator, Optional, Sequence

from ..engine.timing import COLLECTIVE_REGIONS, StepTimer
from ..errors import HANG_EXIT, UserError

# Phases the training loop marks; the one line and the stack file name the phase a hang was in.
DATA_WAIT = "data wait"
# DDP's gradient all-reduce, FSDP2's reduce-scatter and ZeRO's collectives run inside backward, launched by the
# engines with no region the loop could mark without a host sync or a per-step cost: the name says so.
FORWARD_BACKWARD = "forward/backward (including the gradient all-reduce of DDP / FSDP2 / ZeRO)"
COLLECTIVE = "collective"
CHECKPOINT = "checkpoint"
MONITORS = "monitors"
LONG_PHASES = frozenset({CHECKPOINT, MONITORS})

FLOOR_S = 300.0  # the default limit never goes below this (a slow epoch start, a slow shard)
STEP_FACTOR = 10.0  # the default limit: this many times the slowest of the recent steps
RECENT_STEPS = 50  # steps the default limit looks back over
LONG_PHASE_S = 1800.0  # at least this for a new loader's first step, CHECKPOINT and MONITORS
COLLECTIVE_MARGIN = 0.9  # every limit is at most this x engine.timeout_s, so the watchdog fires first

PEER_GRACE_S = 3.0  # after its line, a firing watchdog waits this long before the exit (see _fire)
HANG_ENV = "SCALE_TEST_HANG_AT"  # test only: "RANK:STEP[,RANK:STEP...]" sleeps forever there


def hang_limit(configured: Optional[float], recent_steps: Sequence[float], long: bool,
               collective_timeout_s: float) -> float:
    """Seconds without a completed step before the watchdog fires.

    `configured` is train.hang_timeout_s (None: sized from `recent_steps`, the durations of the
    last steps); `long`: a new loader's first step or a long phase (checkpoint, monitors) is under
    way; `collective_timeout_s` is engine.timeout_s, which every limit stays below."""
    if configured is not None:
        limit = configured
    else:
        limit = max(FLOOR_S, STEP_FACTOR * max(recent_steps, default=0.0))
    if long:
        limit = max(limit, LONG_PHASE_S)
    # A peer waiting for this rank in a collective fails at engine.timeout_s (no stacks, no requeue): fire first.
    return min(limit, COLLECTIVE_MARGIN * collective_timeout_s)


def injected_steps(env_name: str, rank: int) -> FrozenSet[int]:
    """The steps at which a test asks this rank to fail: `env_name` holds RANK:STEP pairs, comma-separated."""
    text = os.environ.get(env_name, "").strip()
    steps = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.split(":")
        if len(fields) != 2 or not all(f.strip().isdigit() for f in fields):
            raise UserError(f"{env_name}={text!r}: expected RANK:STEP pairs, comma-separated (e.g. 1:3)")
        if int(fields[0]) == rank:
            steps.add(int(fields[1]))
    return frozenset(steps)


def hang_injected_for_test() -> None:
    """SCALE_TEST_HANG_AT: this rank stops making progress, as a rank stuck on a bad NIC would."""
    while True:
        time.sleep(3600)


class HangWatchdog:
    """The heartbeat of one rank's training loop and the thread that watches it.

    `enter(phase, step)` and `step_done(step)` are called from the loop on every step: they only
    assign attributes and fill a fixed ring of step durations."""

    def __init__(self, output_dir: Path, rank: int, configured_s: Optional[float], collective_timeout_s: float,
                 timer: Optional[StepTimer] = None, clock: Callable[[], float] = time.monotonic):
        self.folder = Path(output_dir) / "hang"
        self.rank, self.configured_s, self.timer, self.clock = rank, configured_s, timer, clock
        self.collective_timeout_s = collective_timeout_s
        self.phase, self.step = DATA_WAIT, 0
        self._starting = True  # no step done yet since the last new loader: compile, workers, first batch
        self._durations = [0.0] * RECENT_STEPS  # ring of the last step durations (seconds)
        self._measured = 0  # how many of them are real (up to RECENT_STEPS)
        self._next = 0
        self._last = clock()  # when the clock last restarted: a step completed or a long phase began or ended
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------- called by the loop
    def enter(self, phase: str, step: int) -> None:
        """The loop is now in `phase` of `step` (the step in progress, or the one just done)."""
        self.phase, self.step = phase, step

    def step_done(self, step: int) -> None:
        """The heartbeat: `step` completed."""
        now = self.clock()
        if not self._starting:  # the first step (compile, data start) is no measure of the others
            self._durations[self._next] = now - self._last
            self._next = (self._next + 1) % RECENT_STEPS
            self._measured = min(self._measured + 1, RECENT_STEPS)
        self._starting = False
        self._last = now
        self.step = step

    @contextlib.contextmanager
    def long_phase(self, phase: str, step: int) -> Iterator[None]:
        """A phase that may legitimately take long (a checkpoint, monitors): its own allowance, its
        own clock."""
        self._last = self.clock()
        self.phase, self.step = phase, step
        try:
            yield
        finally:
            self._last = self.clock()
            self.phase = DATA_WAIT  # what follows a long phase in the loop

    def restart(self, step: int) -> None:
        """A new loader is about to start (an epoch, a rollback): its workers, its first batch and the step
        on it get the start-up allowance, and that step is no measure of the others."""
        self._last = self.clock()
        self._starting = True
        self.phase, self.step = DATA_WAIT, step

    # ------------------------------------------------------------- the watching thread
    def limit(self) -> float:
        measured = self._durations[:self._measured]
        return hang_limit(self.configured_s, measured, self._starting or self.phase in LONG_PHASES,
                          self.collective_timeout_s)

    def overdue(self) -> bool:
        return self.clock() - self._last > self.limit()

    def start(self) -> "HangWatchdog":
        self._last = self.clock()
        self._thread = threading.Thread(target=self._watch, name=f"scale-hang-watchdog-rank{self.rank}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, max(0.05, self.limit() / 10))):
            if self.overdue():
                self._fire()

    def describe_phase(self) -> str:
        """The phase, with the timed region inside it where that is a collective (e.g. the all-gather)."""
        region = self.timer.current if self.timer is not None else None
        if self.phase == FORWARD_BACKWARD and region in COLLECTIVE_REGIONS:
            return f"{COLLECTIVE} ({region})"
        return self.phase

    def _fire(self) -> None:
        """Write this rank's stacks, log one line, exit HANG_EXIT (the main thread is stuck: os._exit)."""
        waited, phase, step = self.clock() - self._last, self.describe_phase(), self.step
        path = self.folder / f"rank_{self.rank}_step_{step}.txt"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as stream:
                stream.write(f"rank {self.rank} hung at step {step} in phase {phase}: no step completed in "
                             f"{waited:.0f} s (limit {self.limit():.0f} s)\n\n")
                stream.flush()
                faulthandler.dump_traceback(file=stream, all_threads=True)
            evidence = f"stacks in {path}"
        except OSError as err:  # a full or read-only disk must not keep the job alive
            evidence = f"stacks could not be written to {path} ({err.strerror or err})"
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stdout.flush()
        print(f"scale: hang: rank {self.rank} made no progress at step {step} in phase {phase} for {waited:.0f} s "
              f"(limit {self.limit():.0f} s, train.hang_timeout_s); {evidence}; exiting {HANG_EXIT}",
              file=sys.stderr, flush=True)
        # The peers waiting for this rank hung at the same moment and their watchdogs fire within a poll or
        # two: leaving at once would fail their collective first (exit 1, no stacks). Give them that time.
        time.sleep(PEER_GRACE_S)
        os._exit(HANG_EXIT)
