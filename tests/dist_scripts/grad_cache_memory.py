"""Peak resident memory of one gradient-cached training step (single process, CPU).

python grad_cache_memory.py OUT_DIR GLOBAL_BATCH [MICRO_BATCH]  ->  prints JSON with the rise
of the process's own RSS high-water mark over the step (bench/train_step.py's peak_rss_bytes:
ru_maxrss would start at the launcher's resident set, which it inherits across execve). One process per size, so
no allocator cache from a previous size hides or inflates the next one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.train_step import peak_rss_bytes  # noqa: E402
from scale.config import load_config  # noqa: E402
from scale.trainer import Trainer  # noqa: E402
from tests.conftest import TINY_OVERRIDES  # noqa: E402


def main() -> int:
    out, batch = Path(sys.argv[1]), int(sys.argv[2])
    chunk = sys.argv[3] if len(sys.argv) > 3 else "null"
    torch.set_num_threads(1)
    cfg = load_config(None, [*TINY_OVERRIDES, f"train.output_dir={out}", "engine.name=single",
                             f"data.num_samples={max(batch, 256)}", f"train.global_batch={batch}",
                             f"train.micro_batch={chunk}"])
    trainer = Trainer(cfg)
    images = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    before = peak_rss_bytes() // 1024
    metrics = trainer.train_step(images)
    after = peak_rss_bytes() // 1024
    print(json.dumps({"batch": batch, "chunk": chunk, "rise_kb": after - before, "peak_kb": after,
                      "loss": float(metrics["loss"]), "chunks": float(metrics["micro_batches"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
