"""Shared test fixtures: tiny configs that train in seconds on 2 CPU cores."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scale.config import RunConfig, load_config  # noqa: E402

# Two cores: keep intra-op threads fixed so runs are reproducible and tests don't fight.
torch.set_num_threads(int(os.environ.get("SCALE_TEST_THREADS", "2")))

TINY_OVERRIDES = (
    "model.name=vit_tiny_patch4_28",
    "data.name=synthetic",
    "data.num_samples=256",
    "data.num_workers=0",
    "data.mean=[0.5]",
    "data.std=[0.25]",
    "train.micro_batch=32",
    "train.epochs=2",
    "train.precision=fp32",
    "train.device=cpu",
    "train.log_every=1",
    "train.ckpt_every=4",
    "optim.blr=1e-3",
    "optim.warmup_epochs=0.5",
)


def tiny_overrides(*overrides: str) -> list:
    """TINY_OVERRIDES then `overrides`; the synthetic data size is left out when `overrides` pick another
    source (a key that does nothing there is an error)."""
    other_source = any(o.startswith("data.name=") and o != "data.name=synthetic" for o in overrides)
    return [o for o in TINY_OVERRIDES if not (other_source and o.startswith("data.num_samples="))] + list(overrides)


def tiny_config(tmp_path: Path, *overrides: str) -> RunConfig:
    """A ~1 s/step config on CPU: ViT-Tiny depth 6 on 28x28 synthetic images, 8 steps/epoch."""
    return load_config(None, tiny_overrides(f"train.output_dir={tmp_path / 'run'}", *overrides))


@pytest.fixture
def tiny_cfg(tmp_path: Path):
    def make(*overrides: str) -> RunConfig:
        return tiny_config(tmp_path, *overrides)
    return make


def python_env(extra: dict | None = None) -> dict:
    """Environment for subprocesses that import scale from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_args(*args: Sequence[str]) -> list:
    return [sys.executable, *args]
