"""Where training metrics go. The console gets one short line per log step (step / total,
loss, lr, the objective's headline metrics, img/s, ETA) or, when interactive, a tqdm bar
carrying the same fields; every metric goes to TensorBoard (and, from the trainer, to
metrics.jsonl). Rank 0 only: the trainer disables the reporter elsewhere."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, TextIO, Tuple

from tqdm import tqdm

# (metric key, console label): what the objective wants on the line besides loss and lr.
Headline = Sequence[Tuple[str, str]]


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 7 -> '7s'."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_value(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def console_fields(record: Dict[str, object], headline: Headline) -> Dict[str, str]:
    """The few fields worth a glance, in order: loss, lr, headline metrics, img/s."""
    fields: Dict[str, str] = {}
    for key, label in (("loss", "loss"), ("lr", "lr"), *headline):
        value = record.get(key)
        if isinstance(value, (int, float)):
            fields[label] = format_value(float(value))
    if isinstance(record.get("img_per_s"), (int, float)):
        fields["img/s"] = f"{float(record['img_per_s']):.0f}"
    return fields


def format_line(step: int, total: int, fields: Dict[str, str], eta_s: Optional[float]) -> str:
    parts = [f"step {step}/{total}", *(f"{label} {text}" for label, text in fields.items())]
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def printable_label(label: str, stream: TextIO) -> str:
    """'τ' where the stream can encode it, its ASCII name where it cannot (a C-locale log file)."""
    try:
        label.encode(getattr(stream, "encoding", None) or "utf-8")
        return label
    except (UnicodeEncodeError, LookupError):
        return {"τ": "tau"}.get(label, label.encode("ascii", "replace").decode())


class ProgressReporter:
    def __init__(self, log_dir: Path, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 stream: Optional[TextIO] = None, interactive: Optional[bool] = None, headline: Headline = ()):
        self.enabled = enabled
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.headline = [(key, printable_label(label, self.stream)) for key, label in headline]
        self.bar = None
        self.writer = None
        # ETA from the wall clock since the first logged step of this process (warm-up, evals and
        # checkpoints included: what the user waits for), not from one window's img/s.
        self._clock: Optional[Tuple[float, int]] = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        if self.interactive:
            self.bar = tqdm(total=total_steps, initial=initial_step, file=self.stream, dynamic_ncols=True,
                            unit="step")

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def eta(self, step: int, now: Optional[float] = None) -> Optional[float]:
        now = time.perf_counter() if now is None else now
        if self._clock is None:
            self._clock = (now, step)
            return None
        started, first_step = self._clock
        if step <= first_step:
            return None
        return (now - started) / (step - first_step) * max(self.total - step, 0)

    def log(self, step: int, metrics: Dict[str, object]) -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, step)
        fields = console_fields(metrics, self.headline)
        eta = self.eta(step)
        if self.bar is not None:  # tqdm shows its own rate and ETA
            self.bar.set_postfix_str(", ".join(f"{label} {text}" for label, text in fields.items()), refresh=True)
        else:
            print(format_line(step, self.total, fields, eta), file=self.stream, flush=True)

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
