"""Starting DataLoader worker processes that survive the signals meant for the trainer,
and never outlive the process that started them.

SLURM (scancel, the time limit, slurmstepd) signals every process of a job step, so the
DataLoader workers receive the SIGTERM / SIGUSR1 meant for the trainer. Their default
action kills them, and the trainer then dies on its next fetch without a checkpoint.
Workers therefore do not act on these signals: the trainer alone decides when to stop,
and it ends its workers itself.

But a SIGTERM from the worker's own parent is the parent ending it: torch's shutdown of
an iterator, and multiprocessing's exit handler, which at interpreter exit terminates
the workers of any iterator still alive (a global in a script, an exception's traceback)
and then joins them. A worker that ignored that signal would hang its parent forever.
So workers keep the stop signals blocked and a thread takes them with `sigtimedwait`,
which tells who sent each one: one from the parent ends the worker, any other is
dropped. The same thread ends a worker whose parent has died (it is then reparented),
even while the worker is stuck in a read that torch's own parent check never gets to.
The signals are blocked while the workers are forked, so none can reach a worker
before its thread takes them.

A worker's own children (a `pipe:` shard's `curl` or `cat`) end with it: an ended worker's
reader would otherwise run on, reparented, after the trainer has exited.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import signal
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PARENT_CHECK_S = 1.0  # how often a worker looks whether its parent is still there


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the trainer's stop signals are not for the workers,
    but the parent's SIGTERM, or the parent's death, ends the worker."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the watcher below inherits the mask
    # Run at a worker's normal end too (multiprocessing runs its finalizers before the process exits).
    multiprocessing.util.Finalize(None, end_descendants, exitpriority=100)
    parent = multiprocessing.parent_process()  # the process that started the worker, whatever the start method
    threading.Thread(target=_watch_stop_signals, args=(parent.pid if parent else os.getppid(), os.getppid()),
                     name="scale-worker-stop-signals", daemon=True).start()


def _watch_stop_signals(parent_pid: int, forked_by: int) -> None:
    """Drop the stop signals that others send; exit on the parent's SIGTERM or when the
    process that forked the worker is gone."""
    while True:
        received = signal.sigtimedwait(STOP_SIGNALS, PARENT_CHECK_S)
        parent_ends_us = received is not None and received.si_signo == signal.SIGTERM and received.si_pid == parent_pid
        if parent_ends_us or os.getppid() != forked_by:
            end_descendants()
            os._exit(0)  # what the parent asked for (or no one is left to ask): no other cleanup to wait on


def end_descendants() -> None:
    """SIGKILL every process below this one (a `sh -c` may not exec its command, so a reader can
    be a grandchild) and reap the children."""
    below = _descendants(os.getpid())
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in below:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # a grandchild, or already reaped (by its Popen)
            pass


def _descendants(root: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while listed
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def start_workers(loader: Iterable[Any]) -> Iterator[Any]:
    """`iter(loader)`, with the stop signals blocked while worker processes are forked."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def loader_generator(seed: int) -> torch.Generator:
    """The generator a DataLoader draws its workers' base seed from, so that starting an
    iterator never draws from (and shifts) the global RNG that drop path uses."""
    return torch.Generator().manual_seed(seed)
