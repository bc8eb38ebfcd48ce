"""DeepSpeed reliability checks, one torchrun launch (tests/test_deepspeed_reliability.py reads the JSON).

Each rank writes `<out>/rank<r>.json`. Scenarios, all on CPU / gloo:

- bounds: OCL's log-temperature pinned (min = init = max temperature) under a large learning
  rate, so every optimizer step moves it off its bound; after a few `engine.step()`s the module's copy, and under DeepSpeed ZeRO 1/2/3 the
  optimizer's fp32 master copy too, must equal the bound. DDP and FSDP2 (DTensor shards)
  run the base engine's clamp. Each DeepSpeed stage then saves a checkpoint (kept for the
  export tests), resumes from it, and resumes from crafted copies whose model-states or
  optimizer-states files would create a file when unpickled: refused, and no file appears.
- bf16: train.precision=bf16 on CPU, ZeRO 1/3 with a projection head: the encoder computes
  in bf16, the temperature and the head's weights are fp32 parameters, and the temperature
  moves by less than one bf16 step (fp32 precision).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from scale.config import load_config  # noqa: E402
from scale.engine import build_engine, plan_batch  # noqa: E402
from scale.errors import UserError, one_line  # noqa: E402
from scale.masking import MaskContext, build_mask_generator  # noqa: E402
from scale.pretraining import build_pretrain_module  # noqa: E402
from scale.trainer.optim import build_optimizer  # noqa: E402
from tests.conftest import TINY_OVERRIDES  # noqa: E402

torch.set_num_threads(1)
BATCH = 4  # per rank
TEMPERATURE = 0.07


class CreatesFile:
    """Unpickling this creates `marker`: what a crafted checkpoint could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def config(out: Path, *overrides: str):
    return load_config(None, [*TINY_OVERRIDES, "model.name=vit_tiny_patch7_28", f"train.micro_batch={BATCH}",
                              f"train.output_dir={out}", *overrides])


def build(cfg, lr: float):
    torch.manual_seed(0)
    module = build_pretrain_module(cfg)
    engine = build_engine(cfg, torch.device("cpu"))
    engine.setup(module, lambda m: build_optimizer(m, cfg.optim, lr),
                 plan_batch(cfg.train, engine.world_size, module.objective.couples_batch))
    return engine


def train(engine, cfg, steps: int, amp_dtype=None) -> None:
    """The trainer's step: forward, backward, engine.step (which applies the parameter bounds)."""
    g = torch.Generator().manual_seed(100 + engine.rank)
    spec = engine.unwrapped().encoder.spec
    masking = build_mask_generator(cfg.mask, spec.grid_size)
    for _ in range(steps):
        images = torch.randn(BATCH, spec.in_chans, spec.img_size, spec.img_size, generator=g)
        masks = masking(BATCH, MaskContext(g, torch.device("cpu")))
        with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = engine.forward(images, masks)
        engine.backward(out.loss)
        engine.step(None)


def temperature_copies(engine) -> dict:
    """The log-temperature as the module holds it and, under DeepSpeed, as the optimizer's fp32 master."""
    param = engine.unwrapped().objective.log_temperature
    if engine.name != "deepspeed":
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        return {"module": value.detach().reshape(-1).tolist(), "module_dtype": str(value.dtype)}
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)  # collective
    with deepspeed.zero.GatheredParameters([param]):  # collective under ZeRO-3, a no-op otherwise
        module = param.detach().clone()
    return {"module": module.reshape(-1).tolist(), "module_dtype": str(module.dtype),
            "master": master.reshape(-1).tolist(), "master_dtype": str(master.dtype)}


def refused_load(engine, directory: Path, marker: Path) -> dict:
    try:
        engine.load(directory)
        outcome = {"refused": False, "error": ""}
    except UserError as err:
        outcome = {"refused": True, "error": one_line(err), "type": type(err).__name__}
    outcome["marker_exists"] = marker.exists()
    return outcome


def craft(source: Path, target: Path, pattern: str, marker: Path, rank: int) -> None:
    """Rank 0 copies the checkpoint and replaces the files matching `pattern` with crafted pickles."""
    if rank == 0:
        shutil.copytree(source, target)
        for path in sorted((target / "deepspeed").glob(pattern)):
            torch.save({"module": CreatesFile(str(marker)), "optimizer_state_dict": CreatesFile(str(marker))}, path)
    dist.barrier()


def scenario_bounds(args, rank: int) -> dict:
    pinned = [f"objective.{k}_temperature={TEMPERATURE}" for k in ("min", "init", "max")]
    results = {"bound": torch.tensor(math.log(TEMPERATURE)).item()}
    runs = [("ddp", None), ("fsdp", None)] + [("deepspeed", stage) for stage in (1, 2, 3)]
    for name, stage in runs:
        label = name if stage is None else f"zero{stage}"
        cfg = config(args.out / label, f"engine.name={name}", *pinned,
                     *([f"engine.zero_stage={stage}"] if stage is not None else []))
        engine = build(cfg, lr=0.05)  # Adam moves the log-temperature by ~0.05 a step
        train(engine, cfg, steps=3)
        results[label] = temperature_copies(engine)
        if stage is not None:
            results[label].update(checkpoints(args, engine, label, rank))
    return results


def checkpoints(args, engine, label: str, rank: int) -> dict:
    """Save, resume (weights_only=True must accept DeepSpeed's own files), then refuse crafted copies."""
    saved = args.out / "checkpoints" / label
    if rank == 0:
        saved.mkdir(parents=True)
    dist.barrier()
    engine.save(saved, {"step": 3, "config": {"model": {"name": "vit_tiny_patch7_28"}}, "note": label})
    dist.barrier()
    out = {"resumed_extra": engine.load(saved), "resumed": temperature_copies(engine)}
    for kind, pattern in (("model_states", "*model_states.pt"), ("optim_states", "*optim_states.pt")):
        marker = args.out / f"pwned_{label}_{kind}"
        crafted = args.out / "crafted" / f"{label}_{kind}"
        craft(saved, crafted, pattern, marker, rank)
        out[f"crafted_{kind}"] = refused_load(engine, crafted, marker)
        dist.barrier()
    return out


def scenario_bf16(args, rank: int) -> dict:
    results = {}
    for stage in (1, 3):
        label = f"zero{stage}"
        cfg = config(args.out / f"bf16_{label}", "engine.name=deepspeed", f"engine.zero_stage={stage}",
                     "train.precision=bf16", "objective.head.layers=2", "objective.head.hidden_dim=32",
                     "objective.head.out_dim=16")
        engine = build(cfg, lr=1e-3)
        module = engine.unwrapped()
        seen = {}
        module.encoder.blocks[0].mlp.fc1.register_forward_hook(
            lambda _m, _i, out: seen.__setitem__("encoder_fc1_output", str(out.dtype)))
        module.objective.head.register_forward_hook(
            lambda _m, _i, out: seen.__setitem__("head_output", str(out.dtype)))
        before = temperature_copies(engine)
        train(engine, cfg, steps=3, amp_dtype=torch.bfloat16)
        results[label] = {"before": before, "after": temperature_copies(engine), **seen,
                          "head_dtypes": sorted({str(p.dtype) for p in module.objective.head.parameters()}),
                          "autocast": engine.ds_config.get("torch_autocast"), "bf16": engine.ds_config.get("bf16")}
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenarios", help="comma-separated: bounds, bf16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])  # torchrun's; the engines create the process group
    results = {scenario: {"bounds": scenario_bounds, "bf16": scenario_bf16}[scenario](args, rank)
               for scenario in args.scenarios.split(",")}
    with open(args.out / f"rank{rank}.json", "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
