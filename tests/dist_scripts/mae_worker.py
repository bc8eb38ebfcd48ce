"""MAE under DDP / FSDP2 (torchrun, 2 ranks, gloo): gradients of one step against one process.

Each rank takes half of a global batch of 16 images under masks drawn once for the whole
batch. The engine's gradients (after its synchronisation) of one pass, and of exact
accumulation in micro-batches of 3, must equal those of one process on the concatenated
batch, with one gradient synchronisation per step. Rank r writes `<out>/mae_<engine>_rank<r>.json`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker import SyncCounter, compare_grads, counted_step, one_pass, tiny, zero_grads  # noqa: E402

from scale.engine import GradientAccumulation, build_engine, plan_batch  # noqa: E402
from scale.masking import MaskContext, SignalRequest, build_mask_generator  # noqa: E402
from scale.pretraining import build_pretrain_module  # noqa: E402
from scale.trainer.optim import build_optimizer  # noqa: E402

MAE_TINY = ("objective.name=mae", "mask.name=random", "mask.ratio=0.75", "model.init=mae",
            "model.train_patch_embed=true", "objective.decoder.dim=64", "objective.decoder.depth=2",
            "objective.decoder.num_heads=4")
torch.set_num_threads(1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    global_batch, micro = 16, 3
    cfg = tiny(args.out / "mae", *MAE_TINY, f"engine.name={args.engine}", f"train.global_batch={global_batch}",
               f"train.micro_batch={micro}")
    torch.manual_seed(0)
    module = build_pretrain_module(cfg)
    init_state = {k: v.clone() for k, v in module.state_dict().items()}
    engine = build_engine(cfg, torch.device("cpu"))
    world, rank = engine.world_size, engine.rank
    plan = plan_batch(cfg.train, world, module.objective.couples_batch)
    engine.setup(module, lambda m: build_optimizer(m, cfg.optim, 1e-3), plan)
    g = torch.Generator().manual_seed(123)
    images = torch.randn(global_batch, 1, 28, 28, generator=g)
    masks = build_mask_generator(cfg.mask, 7)(global_batch, MaskContext(g, torch.device("cpu")))
    per_rank = global_batch // world
    x, local_masks = images[rank * per_rank:(rank + 1) * per_rank], masks.rows(rank * per_rank, (rank + 1) * per_rank)

    results = {"world_size": world, "plan_mode": plan.mode}
    # DDP rebuilds its gradient buckets after the first synchronised backward: warm up once so both
    # counted steps see the same buckets.
    one_pass(engine, x, local_masks)
    zero_grads(engine)
    count_syncs = SyncCounter(engine)
    runs = {"one_pass": counted_step(engine, count_syncs, "one_pass", lambda: one_pass(engine, x, local_masks)),
            "accumulate": counted_step(engine, count_syncs, "accumulate",
                                       lambda: GradientAccumulation(engine, micro)(x, local_masks,
                                                                                   contextlib.nullcontext))}
    results["syncs"] = count_syncs.counts
    # A mask generator's model signal goes through the engine (FSDP2 unshards each block for it).
    signal = engine.model_signal(x, SignalRequest("attention", blocks=6))
    results["signal_shape"] = list(signal.shape)
    if rank == 0:
        torch.manual_seed(0)
        ref = build_pretrain_module(cfg)
        ref.load_state_dict(init_state)
        ref_out = ref(images, masks)
        ref_out.loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        results["signal_max_diff"] = (signal - ref.model_signal(x, SignalRequest("attention", blocks=6))).abs().max().item()
        for mode, (loss, grads) in runs.items():
            results[mode] = compare_grads(loss, grads, ref_out.loss, ref_grads)
    engine.barrier()
    (args.out / f"mae_{args.engine}_rank{rank}.json").write_text(json.dumps(results))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
