"""`train.micro_batch: auto` (issue 28, point 3): the largest micro-batch the device's free memory holds by
the step's memory estimate (scale/engine/memory_plan.py, the formula that matched the H200's peak within 2%),
the per-rank batch split into equal passes where it can, a no-op with a note on a CPU, and one-line errors."""
from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

from conftest import REPO, python_env
from scale.config import ConfigError, load_config
from scale.engine import GRAD_CACHE, plan_batch
from scale.engine.memory_plan import (MARGIN, StepMemory, choose_micro_batch, encoder_stack, largest_micro_batch,
                                      param_count, pretrain_step_memory, split_per_rank_batch, step_memory)
from scale.models import MODELS
from scale.pretraining import build_pretrain_module
from scale.trainer import Trainer

GIB = 1024 ** 3


@functools.lru_cache(maxsize=None)
def recipe_memory(name: str) -> StepMemory:
    """The recipe's step memory in bf16 without activation checkpointing, from its module (built once)."""
    cfg = load_config(REPO / "recipes" / f"{name}.yaml")
    module = build_pretrain_module(cfg)
    return pretrain_step_memory(module, cfg.mask.ratio, bf16=True, checkpointed=False)


@pytest.mark.parametrize("name", ["ocl_vitb16", "mae_vitb16"])
@pytest.mark.parametrize("free_gib", [20.0, 80.0, 139.0])
def test_the_largest_micro_batch_that_fits_the_free_memory(name, free_gib):
    memory = recipe_memory(name)
    largest = largest_micro_batch(memory, free_gib * GIB)
    assert largest > 0
    assert memory.at(largest) <= MARGIN * free_gib * GIB < memory.at(largest + 1)


def test_the_mae_estimate_counts_the_decoder_over_every_patch():
    spec = MODELS.build("vit_base_patch16")
    encoder_only = step_memory(param_count(spec), [encoder_stack(spec, 1 + 49)], bf16=True, checkpointed=False)
    mae = recipe_memory("mae_vitb16")  # 49 visible of 196 patches, 8 decoder blocks of 512 over 197 tokens
    decoder = 8 * (22 * 512 + 4 * 2048) * 197
    assert mae.bytes_per_image == pytest.approx(encoder_only.bytes_per_image + decoder)


def test_the_moved_estimate_is_the_one_that_matched_the_h200():
    """OCL ViT-B/16 at mask 0.3 (2 x 69 visible + 2 CLS): docs/throughput.md's 46.1 MiB/image, 1.4 GiB of
    state, ~1,560 images on 80 GiB, and 14.94 GiB at micro-batch 300 (the H200 measured 15.23)."""
    spec = MODELS.build("vit_base_patch16")
    memory = step_memory(param_count(spec), [encoder_stack(spec, 138)], bf16=True, checkpointed=False)
    assert memory.bytes_per_image / 2 ** 20 == pytest.approx(46.1, abs=0.05)
    assert memory.state_bytes / GIB == pytest.approx(1.44, abs=0.01)
    assert largest_micro_batch(memory, 80 * GIB) == 1567
    assert memory.at(300) / GIB == pytest.approx(14.94, abs=0.01)


@pytest.mark.parametrize("per_rank,largest,micro", [
    (4096, 5000, 4096),  # fits: one pass
    (4096, 1567, 1024),  # 3 passes do not divide 4096, 4 equal ones do
    (9600, 2000, 1920),  # 5 equal passes
    (7, 3, 3),  # prime: balanced passes 3 + 3 + 1 (no equal split within twice the fewest)
    (300, 100, 100),
])
def test_the_per_rank_batch_is_split_into_equal_passes_where_it_can(per_rank, largest, micro):
    assert split_per_rank_batch(per_rank, largest) == micro
    assert micro <= largest


def test_auto_on_a_gpu_sizes_the_plan_and_says_what_it_chose():
    cfg = load_config(REPO / "recipes/ocl_vitb16.yaml", ["train.micro_batch=auto"])
    memory = recipe_memory("ocl_vitb16")
    per_rank = plan_batch(cfg.train, 1).per_rank_batch
    assert per_rank == 9600
    choice = choose_micro_batch(per_rank, torch.device("cuda"), memory, free_bytes=80 * GIB)
    assert choice.micro_batch is not None and choice.micro_batch <= largest_micro_batch(memory, 80 * GIB)
    assert per_rank % choice.micro_batch == 0
    plan = plan_batch(cfg.train, 1, True, choice.micro_batch)
    assert plan.mode == GRAD_CACHE and plan.chunk == choice.micro_batch and plan.global_batch == 9600
    assert "train.micro_batch=auto" in choice.note and "estimate" in choice.note and "GiB free" in choice.note
    roomy = choose_micro_batch(per_rank, torch.device("cuda"), memory, free_bytes=1000 * GIB)
    assert roomy.micro_batch is None and plan_batch(cfg.train, 1, True, roomy.micro_batch).chunk is None


def test_auto_on_cpu_is_one_pass_with_a_note(tmp_path, capsys):
    cfg = load_config(REPO / "recipes/ocl_cpu_tiny.yaml", [
        "train.global_batch=16", "train.micro_batch=auto", "train.device=cpu", "data.name=synthetic",
        "data.num_samples=32", "data.num_workers=0", f"train.output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    assert trainer.batch_plan.per_rank_batch == 16 and trainer.batch_plan.chunk is None and trainer.passes is None
    err = capsys.readouterr().err
    assert "train.micro_batch=auto: on cpu" in err and "one pass of the per-rank batch (16 images)" in err


def test_the_trainer_plans_its_passes_with_autos_choice(tmp_path, monkeypatch, capsys):
    """What the trainer does with a GPU's answer (no GPU here: the choice is stood in): gradient caching in
    passes of the chosen size, and the choice's line on stderr."""
    import scale.trainer.trainer as trainer_module
    from scale.engine import GradCache
    from scale.engine.memory_plan import MicroBatchChoice

    asked = []

    def choose(per_rank, device, memory, free_bytes=None):
        asked.append((per_rank, memory.state_bytes > 0 and memory.bytes_per_image > 0))
        return MicroBatchChoice(4, "train.micro_batch=auto: 4 of 16 images per pass (stand-in)")

    monkeypatch.setattr(trainer_module, "choose_micro_batch", choose)
    cfg = load_config(REPO / "recipes/ocl_cpu_tiny.yaml", [
        "train.global_batch=16", "train.micro_batch=auto", "train.device=cpu", "data.name=synthetic",
        "data.num_samples=32", "data.num_workers=0", f"train.output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    assert asked == [(16, True)]
    assert trainer.batch_plan.chunk == 4 and trainer.batch_plan.mode == GRAD_CACHE and isinstance(trainer.passes, GradCache)
    assert "4 of 16 images per pass (stand-in)" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,says", [
    (["train.micro_batch=lots"], "train.micro_batch: expected an integer, auto or null; got 'lots'"),
    (["train.micro_batch=auto", "train.global_batch=null"], "train.micro_batch=auto needs train.global_batch"),
    (["train.micro_batch=0"], "train.micro_batch must be in [1, inf] or null, got 0"),
])
def test_a_bad_micro_batch_is_one_line(overrides, says):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "recipes/ocl_cpu_tiny.yaml", overrides)
    assert str(err.value).startswith(says) and "\n" not in str(err.value)


def test_the_cli_refuses_auto_without_a_global_batch_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "scale.train", "train.micro_batch=auto", "train.global_batch=null",
                           f"train.output_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          env=python_env(), cwd=tmp_path, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "train.micro_batch=auto needs train.global_batch" in lines[0]
    assert not (tmp_path / "run").exists()
