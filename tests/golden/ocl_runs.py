"""OCL's per-step losses for fixed configs, recorded before the method-contract refactor.

    python tests/golden/ocl_runs.py --record     # rewrite ocl_losses.json (only on purpose)

tests/test_golden_ocl.py reruns every config and compares each step's loss with the file.
Re-recorded once since, on purpose, when the workers began to hand over uint8 batches (issue 17:
the synthetic images are now rounded to uint8 before the crop); fed the previous float batches,
the new code reproduced the earlier file bit for bit (single config, 6 steps), so the step itself
did not change.
The 2-rank entries were re-recorded on purpose once more (issue 27): global batch k and its masks no
longer depend on the world size, so they now equal the single-process losses up to reduction-order
rounding; the single-process entries did not change.
Kernels are pinned (SDPA attention, the for-loop AdamW that was torch's CPU default when the file
was recorded; a later key, optim.implementation, pins it), so a refactor that changes what
a step computes shows up as a different loss.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("ocl_losses.json")
COMMON = ["model.name=vit_tiny_patch4_28", "model.attn_backend=sdpa", "data.name=synthetic", "data.num_samples=256",
          "data.num_workers=0", "data.mean=[0.5]", "data.std=[0.25]", "train.epochs=2", "train.max_steps=6",
          "train.precision=fp32", "train.device=cpu", "train.log_every=1", "train.ckpt_every=1000",
          "optim.blr=1e-3", "optim.warmup_epochs=0.5", "objective.name=ocl", "mask.name=random_two_group",
          "optim.implementation=for_loop"]
# name -> (processes, overrides)
CONFIGS: Dict[str, tuple] = {
    "single": (1, ["train.batch_size=32"]),
    "single_grad_cache": (1, ["train.global_batch=32", "train.micro_batch=8"]),
    "ddp_2": (2, ["engine.name=ddp", "train.batch_size=16"]),
    "ddp_2_grad_cache": (2, ["engine.name=ddp", "train.global_batch=32", "train.micro_batch=8"]),
    "fsdp_2": (2, ["engine.name=fsdp", "train.batch_size=16"]),
}


def run(name: str, workdir: Path) -> List[float]:
    processes, overrides = CONFIGS[name]
    out = workdir / name
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    cmd = [*launcher, "-m", "scale.train", *COMMON, *overrides, f"train.output_dir={out}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                                                     "SLURM_", "ACCELERATE_"))}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="rewrite the golden file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        losses = {name: run(name, Path(tmp)) for name in CONFIGS}
    print(json.dumps(losses, indent=2))
    if args.record:
        GOLDEN.write_text(json.dumps({"overrides": COMMON, "configs": {k: v[1] for k, v in CONFIGS.items()},
                                      "losses": losses}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
