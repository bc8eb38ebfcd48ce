"""EHM under DDP / FSDP2 (torchrun, 2 ranks, gloo) against one process.

Each rank draws its masks as the trainer does: from its own images, the model's attention reached
through the engine (FSDP2 unshards each block for it), and the generator of (seed, step, rank).
One process rebuilds both ranks' masks from the same images with an unwrapped copy of the model
and the same generators; the masks must be identical, and the engine's gradients those of one
process on the concatenated batch. Then one optimizer step and the EMA signal source's update
(gathered from FSDP2's shards) must match one process's. Rank r writes `<out>/ehm_<engine>_rank<r>.json`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker import compare_grads, local_grads, one_pass, tiny  # noqa: E402

from scale.engine import build_engine, plan_batch  # noqa: E402
from scale.masking import MaskContext, Masks, build_mask_generator, step_generator  # noqa: E402
from scale.pretraining import build_pretrain_module  # noqa: E402
from scale.trainer.optim import build_optimizer  # noqa: E402

MAE_EHM = ("objective.name=mae", "mask.name=ehm", "mask.ratio=0.75", "model.init=mae", "model.train_patch_embed=true",
           "objective.decoder.dim=64", "objective.decoder.depth=2", "objective.decoder.num_heads=4",
           "mask.ehm.signal_batch=4", "mask.ehm.depth=fixed", "mask.ehm.fixed_depth=0.5",
           "mask.ehm.source=ema", "mask.ehm.ema_decay=0.5")
torch.set_num_threads(1)


def draw(generator_of, rank: int, images: torch.Tensor, signal) -> Masks:
    context = MaskContext(step_generator(0, 3, rank, torch.device("cpu")), torch.device("cpu"), step=3,
                          images=images, model_signal=signal)
    return generator_of(len(images), context)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    global_batch = 16
    cfg = tiny(args.out / "ehm", *MAE_EHM, f"engine.name={args.engine}", f"train.micro_batch={global_batch // 2}")
    torch.manual_seed(0)
    module = build_pretrain_module(cfg)
    init_state = {k: v.clone() for k, v in module.state_dict().items()}
    engine = build_engine(cfg, torch.device("cpu"))
    world, rank = engine.world_size, engine.rank
    engine.setup(module, lambda m: build_optimizer(m, cfg.optim, 1e-3), plan_batch(cfg.train, world, False))
    masking = build_mask_generator(cfg.mask, 7)
    request = masking.needs.model_signal
    images = torch.randn(global_batch, 1, 28, 28, generator=torch.Generator().manual_seed(123))
    per_rank = global_batch // world
    x = images[rank * per_rank:(rank + 1) * per_rank]
    local_masks = draw(masking, rank, x, lambda chunk: engine.model_signal(chunk, request))
    out = one_pass(engine, x, local_masks)
    loss, grads = engine.all_reduce_mean(out.loss.detach()), local_grads(engine)
    engine.step(None)
    engine.update_weight_followers()
    ema = {k: v.detach().clone() for k, v in engine.unwrapped().signal_ema.model.named_buffers()}
    results = {"world_size": world, "depth": local_masks.metrics["ehm_depth"].item()}
    gathered = [torch.zeros_like(local_masks.group_ids) for _ in range(world)]
    torch.distributed.all_gather(gathered, local_masks.group_ids)
    if rank == 0:
        ref = build_pretrain_module(cfg)
        ref.load_state_dict(init_state)
        halves = [draw(masking, r, images[r * per_rank:(r + 1) * per_rank],
                       lambda chunk: ref.model_signal(chunk, request)) for r in range(world)]
        results["masks_equal"] = all(torch.equal(g, h.group_ids) for g, h in zip(gathered, halves))
        masks = Masks(torch.cat([h.group_ids for h in halves]), torch.cat([h.masked_ids for h in halves]))
        ref_out = ref(images, masks)
        ref_out.loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        results["grads"] = compare_grads(loss, grads, ref_out.loss, ref_grads)
        optimizer = build_optimizer(ref, cfg.optim, 1e-3)
        optimizer.step()
        ref.signal_ema.update({n: p.detach() for n, p in ref.encoder.named_parameters()})
        ref_ema = dict(ref.signal_ema.model.named_buffers())
        results["ema_max_diff"] = max((ema[n] - ref_ema[n]).abs().max().item() for n in ref_ema)
        results["ema_moved"] = max((ref_ema[n] - init_state[f"encoder.{n}"]).abs().max().item()
                                   for n in ref_ema if f"encoder.{n}" in init_state)
    engine.barrier()
    (args.out / f"ehm_{args.engine}_rank{rank}.json").write_text(json.dumps(results))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
