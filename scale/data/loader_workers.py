"""Starting DataLoader worker processes that survive the signals meant for the trainer.

SLURM (scancel, the time limit, slurmstepd) signals every process of a job step, so the
DataLoader workers receive the SIGTERM / SIGUSR1 meant for the trainer. Their default
action kills them, and the trainer then dies on its next fetch without a checkpoint.
Workers therefore ignore these signals: the trainer alone decides when to stop, and it
ends its workers itself. The signals are blocked while the workers are forked, so none
can reach a worker before it has set SIG_IGN; the trainer receives any that came in
meanwhile as soon as they are unblocked.
"""
from __future__ import annotations

import signal
from typing import Any, Iterable, Iterator

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the trainer's stop signals are not for the workers."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


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
