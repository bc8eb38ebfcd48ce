"""Where training metrics go: a tqdm bar when interactive, plain lines when not, and
TensorBoard event files either way (rank 0 only)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Optional, TextIO

from tqdm import tqdm


def format_metrics(step: int, total: int, metrics: Dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}" if abs(value) < 1e5 else f"{key} {value:.3e}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


class ProgressReporter:
    def __init__(self, log_dir: Path, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 stream: Optional[TextIO] = None, interactive: Optional[bool] = None):
        self.enabled = enabled
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.bar = None
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        if self.interactive:
            self.bar = tqdm(total=total_steps, initial=initial_step, file=self.stream, dynamic_ncols=True)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                  for k, v in list(metrics.items())[:4]}, refresh=True)
        else:
            print(format_metrics(step, self.total, metrics), file=self.stream, flush=True)

    def log_eval(self, step: int, record: Dict[str, float]) -> None:
        """A monitor's record into TensorBoard as eval/<key>."""
        if self.enabled:
            for key, value in record.items():
                self.writer.add_scalar(f"eval/{key}", value, step)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
