"""One segment of a run that changes world size between segments (tests/test_elastic_resume.py).

Launched with torchrun on any number of ranks: continues `<out>/run` from its last checkpoint
(`--resume auto`) up to `--until` steps and checkpoints there. Rank 0 writes
`<out>/<label>.json` (the losses of the steps it ran, the world size, the step it resumed
from) and two plain torch files with the whole state, unsharded and keyed by parameter name:
`<label>_loaded.pt` right after the checkpoint is loaded, `<label>_end.pt` after the last step,
so the test compares what one segment saved with what the next one loaded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from scale.config import load_config  # noqa: E402
from scale.trainer import Trainer  # noqa: E402
from tests.conftest import TINY_OVERRIDES  # noqa: E402

torch.set_num_threads(1)


def full_state(trainer: Trainer) -> Optional[Dict[str, Any]]:
    """Model, AdamW moments and steps, learning rates and the trainer's step, whole (collective; rank 0
    gets them, the other ranks None)."""
    if trainer.engine.name == "deepspeed":
        return deepspeed_full_state(trainer)
    model, optim = get_state_dict(trainer.pretrain_module, trainer.engine.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not trainer.engine.is_main:
        return None
    return {"model": {k: v.detach().clone().reshape(-1) for k, v in model.items()},
            "moments": {f"{name}/{key}": value.detach().clone().reshape(-1) if torch.is_tensor(value) else value
                        for name, state in optim["state"].items() for key, value in state.items()},
            "lr": [group["lr"] for group in trainer.engine.optimizer.param_groups],
            "step": trainer.step}


def deepspeed_full_state(trainer: Trainer) -> Optional[Dict[str, Any]]:
    """full_state under DeepSpeed, whose ZeRO optimizer torch's get_state_dict cannot read: the module
    whole, and each trainable parameter's fp32 master copy and AdamW moments gathered from the ZeRO
    partitions (collective), with the partitions' AdamW step (one for all)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = trainer.engine
    model = engine.full_state_dict()
    if engine.zero_stage < 3:
        # ZeRO 1/2 link each parameter to its AdamW state after the first group's first step (DeepSpeed
        # 0.19.8), when the other groups have none yet; link again, now that every group has one.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    moments: Dict[str, Any] = {}
    for name, param in engine.unwrapped().named_parameters():
        if param.requires_grad:
            moments[f"{name}/fp32"] = safe_get_full_fp32_param(param).detach().clone().reshape(-1)
            for key in ("exp_avg", "exp_avg_sq"):
                moments[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key).detach().clone().reshape(-1)
    moments["step"] = sorted({float(state["step"]) for state in engine.optimizer.optimizer.state.values()})
    if not engine.is_main:
        return None
    return {"model": {k: v.reshape(-1) for k, v in model.items()}, "moments": moments,
            "lr": [group["lr"] for group in engine.optimizer.param_groups], "step": trainer.step}


class RecordingTrainer(Trainer):
    """Saves the whole state right after the resume's load."""

    loaded_file: Path

    def maybe_resume(self):
        path = super().maybe_resume()
        state = full_state(self) if path is not None else None
        if state is not None:
            torch.save(state, self.loaded_file)
        return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--until", type=int, required=True)
    parser.add_argument("--set", dest="override", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(None, [*TINY_OVERRIDES, f"train.output_dir={args.out / 'run'}", f"train.max_steps={args.until}",
                             "train.resume=auto", *args.override])
    trainer = RecordingTrainer(cfg)
    trainer.loaded_file = args.out / f"{args.label}_loaded.pt"
    summary = trainer.fit()
    started = summary.final_step - summary.steps_done
    state = full_state(trainer)
    if trainer.engine.is_main:
        torch.save(state, args.out / f"{args.label}_end.pt")
        (args.out / f"{args.label}.json").write_text(json.dumps({
            "losses": summary.losses, "started": started, "final_step": summary.final_step,
            "world_size": trainer.engine.world_size, "engine": trainer.engine.name,
            "per_rank_batch": trainer.batch_plan.per_rank_batch, "chunks": trainer.batch_plan.num_chunks}))
    trainer.engine.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
