"""Multi-process checks, one scenario per launch (torchrun, accelerate launch or SLURM-style env).

Each rank writes `<out>/<scenario>_<engine>_rank<r>.json`; tests/test_distributed.py reads
them and asserts. Scenarios:

- grads: loss and every parameter gradient of the distributed engine on a global batch
  split over ranks, with and without gradient caching, against one process on the
  concatenated batch under the same masks (rank 0 computes the reference); and how many
  gradient synchronisations each mode ran (DDP: comm-hook calls; FSDP: reduce-scatter
  regions in the profiler).
- train: a short run, a resume from its middle checkpoint, and the exported state dict.

Several scenarios can share one launch: `worker.py grads,train --engine ddp`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from scale.config import load_config  # noqa: E402
from scale.engine import GradCache, build_engine, plan_batch  # noqa: E402
from scale.masking import MaskContext, build_mask_generator  # noqa: E402
from scale.pretraining import build_pretrain_module  # noqa: E402
from scale.trainer.optim import build_optimizer  # noqa: E402
from tests.conftest import TINY_OVERRIDES  # noqa: E402

torch.set_num_threads(1)


def tiny(out: Path, *overrides: str):
    return load_config(None, [*TINY_OVERRIDES, f"train.output_dir={out}", *overrides])


def local_grads(engine) -> dict:
    grads = {}
    for name, p in engine.unwrapped().named_parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.detach().clone()
    return grads


def zero_grads(engine) -> None:
    for p in engine.unwrapped().parameters():
        p.grad = None


class SyncCounter:
    """Gradient synchronisations in a region: DDP bucket all-reduces (a counting comm hook
    around the default all-reduce), FSDP2 reduce-scatters (its profiler regions)."""

    def __init__(self, engine):
        self.engine, self.counts, self.calls = engine, {}, 0
        if engine.name == "ddp":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(state, bucket):
                self.calls += 1
                return allreduce_hook(None, bucket)

            engine.module.register_comm_hook(None, hook)

    @contextlib.contextmanager
    def __call__(self, label: str):
        if self.engine.name == "fsdp":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                yield
            self.counts[label] = sum("FSDP::post_backward_reduce" in e.name for e in prof.events())
        else:
            before = self.calls
            yield
            self.counts[label] = self.calls - before


def one_pass(engine, x, masks):
    out = engine.forward(x, masks)
    engine.backward(out.loss)
    return out


def counted_step(engine, count_syncs, label: str, run) -> tuple:
    """(global loss, local gradients) of `run()` (forwards and backwards), its syncs counted; grads zeroed after."""
    with count_syncs(label):
        out = run()
    result = (engine.all_reduce_mean(out.loss.detach()), local_grads(engine))
    zero_grads(engine)
    return result


def compare_grads(loss, grads: dict, ref_loss, ref_grads: dict) -> dict:
    """An engine's loss and gradients against one process's: worst relative difference, missing names."""
    diffs = {n: (grads[n] - ref_grads[n]).abs().max().item() / max(ref_grads[n].abs().max().item(), 1e-12)
             for n in ref_grads if n in grads}
    return {"loss": loss.item(), "ref_loss": ref_loss.item(), "missing": sorted(set(ref_grads) - set(grads)),
            "extra": sorted(set(grads) - set(ref_grads)), "max_rel_diff": max(diffs.values()),
            "worst": max(diffs, key=diffs.get), "num_grads": len(grads)}


def scenario_grads(args) -> dict:
    global_batch, chunk = 16, 3
    cfg = tiny(args.out / "grads", f"engine.name={args.engine}", f"train.global_batch={global_batch}",
               f"train.micro_batch={chunk}")
    torch.manual_seed(0)
    module = build_pretrain_module(cfg)
    init_state = {k: v.clone() for k, v in module.state_dict().items()}
    engine = build_engine(cfg, torch.device("cpu"))
    world, rank = engine.world_size, engine.rank
    plan = plan_batch(cfg.train, world, module.objective.couples_batch)  # per rank: 8 images in chunks of 3
    engine.setup(module, lambda m: build_optimizer(m, cfg.optim, 1e-3), plan)
    g = torch.Generator().manual_seed(123)
    images = torch.randn(global_batch, 1, 28, 28, generator=g)
    masks = build_mask_generator(cfg.mask, module.encoder.spec.grid_size)(global_batch,
                                                                         MaskContext(g, torch.device("cpu")))
    per_rank = global_batch // world
    x, local_masks = images[rank * per_rank:(rank + 1) * per_rank], masks.rows(rank * per_rank, (rank + 1) * per_rank)

    results = {"world_size": world}
    count_syncs = SyncCounter(engine)
    runs = {"full": counted_step(engine, count_syncs, "full", lambda: one_pass(engine, x, local_masks)),
            "grad_cache": counted_step(engine, count_syncs, "grad_cache",
                                       lambda: GradCache(engine, chunk)(x, local_masks, contextlib.nullcontext))}
    results["syncs"] = count_syncs.counts

    if rank == 0:  # one process, the concatenated batch, the same masks and initial weights
        torch.manual_seed(0)
        ref = build_pretrain_module(cfg)
        ref.load_state_dict(init_state)
        ref_out = ref(images, masks)
        ref_out.loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        for mode, (loss, grads) in runs.items():
            results[mode] = {
                **compare_grads(loss, grads, ref_out.loss, ref_grads),
                "temperature_grad": grads.get("objective.log_temperature", torch.tensor(float("nan"))).item(),
                "ref_temperature_grad": ref_grads["objective.log_temperature"].item(),
            }
    engine.barrier()
    return results


def scenario_train(args) -> dict:
    from scale.trainer import Trainer

    results = {}
    stages = [int(s) for s in args.zero_stages.split(",")] if args.engine == "deepspeed" else [None]
    for stage in stages:
        label = args.engine if stage is None else f"{args.engine}_zero{stage}"
        # 16 images per rank on the test's 2 ranks (--set train.micro_batch=N then splits them into passes)
        extra = [f"engine.name={args.engine}", "train.global_batch=32", f"train.max_steps={args.steps}",
                 "train.ckpt_every=2", *args.override]
        if stage is not None:
            extra.append(f"engine.zero_stage={stage}")
        started = time.perf_counter()
        first = Trainer(tiny(args.out / label / "run1", *extra))
        summary = first.fit()
        exported = first.engine.full_state_dict()
        ckpt = args.out / label / "run1" / "checkpoints" / "step_00000002"
        second = Trainer(tiny(args.out / label / "run2", *extra, f"train.resume={ckpt}"))
        resumed = second.fit()
        reference = build_pretrain_module(second.cfg).state_dict()
        metrics = [json.loads(line) for line in open(args.out / label / "run1" / "metrics.jsonl")] \
            if first.engine.is_main else []
        results[label] = {
            "losses": summary.losses, "resumed_losses": resumed.losses, "resumed_from": resumed.final_step,
            "export_keys_match": sorted(exported) == sorted(reference),
            "export_shapes_match": all(tuple(exported[k].shape) == tuple(v.shape) for k, v in reference.items()
                                       if k in exported),
            "export_is_plain": all(type(v) is torch.Tensor and v.device.type == "cpu" for v in exported.values()),
            "export_matches_checkpoint_weights": _export_matches(first, exported),
            "world_size": first.engine.world_size, "engine": first.engine.name,
            "last_metrics": metrics[-1] if metrics else {}, "seconds": time.perf_counter() - started,
        }
    return results


def _export_matches(trainer, exported) -> bool:
    """The export is the trained model: its temperature equals the live one (not the initial value)."""
    live = trainer.pretrain_module.objective.temperature
    live = live.full_tensor() if hasattr(live, "full_tensor") else live
    if live.numel() == 0:  # ZeRO-3 partitioned: compare through the export only
        return True
    return bool(torch.allclose(exported["objective.log_temperature"].exp(), live.detach().float().cpu(), atol=1e-6))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenarios", help="comma-separated: grads, train")
    parser.add_argument("--engine", default="ddp")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--zero-stages", default="1,2,3")
    parser.add_argument("--steps", type=int, default=4, help="train: steps of the first run (checkpoint at 2)")
    parser.add_argument("--set", dest="override", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    for scenario in args.scenarios.split(","):
        results = {"grads": scenario_grads, "train": scenario_train}[scenario](args)
        rank = dist.get_rank() if dist.is_initialized() else 0
        results["env"] = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / f"{scenario}_{args.engine}_rank{rank}.json", "w") as f:
            json.dump(results, f, indent=1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
