"""EHM on 2 ranks (DDP, FSDP2) equals one process: masks, gradients, and the EMA source's update."""
import json

import pytest

from conftest import REPO
from test_mae_distributed import _torchrun

pytestmark = pytest.mark.distributed

WORKER = REPO / "tests/dist_scripts/ehm_worker.py"


@pytest.mark.parametrize("engine", ["ddp", pytest.param("fsdp", marks=pytest.mark.long)])
def test_two_ranks_with_ehm_equal_one_process(tmp_path, engine):
    _torchrun(str(WORKER), "--engine", engine, "--out", str(tmp_path))
    result = json.loads((tmp_path / f"ehm_{engine}_rank0.json").read_text())
    assert result["world_size"] == 2 and result["depth"] > 1
    assert result["masks_equal"], "a rank's EHM masks differ from one process's on the same images"
    grads = result["grads"]
    assert not grads["missing"] and abs(grads["loss"] - grads["ref_loss"]) <= 1e-5 * abs(grads["ref_loss"]), grads
    assert grads["max_rel_diff"] < 1e-4, grads
    assert result["ema_moved"] > 1e-6 and result["ema_max_diff"] < 1e-5 * max(result["ema_moved"], 1.0), result


@pytest.mark.long
def test_zero3_gathers_for_the_signal_and_the_ema_and_resumes(tmp_path):
    """ZeRO-3 partitions every parameter: the attention signal and the EMA update must gather them."""
    from conftest import TINY_OVERRIDES

    out = tmp_path / "run"
    args = ("-m", "scale.train", *TINY_OVERRIDES, "engine.name=deepspeed", "engine.zero_stage=3",
            "mask.name=ehm_two_group", "mask.ehm.source=ema", "mask.ehm.depth=fixed", "mask.ehm.fixed_depth=0.5",
            "train.global_batch=16", "train.ckpt_every=2", f"train.output_dir={out}")
    _torchrun(*args, "train.max_steps=2")
    _torchrun(*args, "train.max_steps=3", "train.resume=auto")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["ehm_depth"] > 1 for r in rows)
    straight = tmp_path / "straight"  # the same 3 steps without the stop: the resumed step 3 is identical
    _torchrun(*[a if not a.startswith("train.output_dir=") else f"train.output_dir={straight}" for a in args],
              "train.max_steps=3")
    reference = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference]
    from scale.checkpoint_io.deepspeed import read_model

    module, _ = read_model(out / "checkpoints/step_00000002")
    ema = {k: v for k, v in module.items() if k.startswith("signal_ema.model.")}
    assert ema and all(v.numel() > 0 for v in ema.values())
