"""Per-step timings of regions (communication, optimizer step) that engines and the trainer share."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any, Dict, Iterator, Optional

import torch

# Regions that are collectives (scale/engine/distributed.py's all-gather): a rank that hangs in one
# waits for a peer, which the hang watchdog's line says (scale/trainer/watchdog.py).
COLLECTIVE_REGIONS = frozenset({"allgather_fwd", "allgather_bwd"})


class StepTimer:
    """Seconds spent per key within one step (communication, optimizer step, ...).

    On CUDA, `sync=True` synchronises the device around each timed region so the time is
    the region's own and not whatever the stream had queued; on CPU plain perf_counter.
    A synchronisation stalls the host until the device drains its queue, so it happens only
    in the steps `begin_step` is told are measured (the trainer's log steps); the other
    steps' regions are host time and nobody reads them.
    """

    def __init__(self, device: torch.device, sync: bool = True):
        self.can_sync = sync and device.type == "cuda"
        self.sync = self.can_sync  # this step's regions synchronise (begin_step chooses per step)
        self.device = device
        self.totals: Dict[str, float] = defaultdict(float)
        self._open: Dict[Any, float] = {}
        self.current: Optional[str] = None  # the region opened last, until it closes: where a hang sits


    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self, key: str, token: Any = None) -> None:
        self._open[(key, token)] = self._now()
        self.current = key

    def stop(self, key: str, token: Any = None) -> None:
        if self.current == key:
            self.current = None
        begun = self._open.pop((key, token), None)
        if begun is not None:
            self.totals[key] += self._now() - begun

    @contextlib.contextmanager
    def time(self, key: str) -> Iterator[None]:
        self.start(key)
        try:
            yield
        finally:
            self.stop(key)

    def begin_step(self, measured: bool) -> None:
        """Forget the last step's regions; this step's synchronise the device only if `measured`."""
        self.pop()
        self.sync = self.can_sync and measured

    def pop(self) -> Dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        self._open.clear()
        self.current = None
        return out
