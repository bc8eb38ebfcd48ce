"""Resuming on another world size (issue 27, point 2).

A checkpoint written on W ranks continues on W' ranks with train.global_batch unchanged
(each rank's batch and gradient-caching chunks re-derived by plan_batch) and the model,
AdamW moments and steps, learning rate, step and temperature as saved. The resume check
accepts the change where the data order does not depend on the world size (map-style
sources) and refuses it, in one line, for streaming shards and for a null
train.global_batch (naming the value that keeps the checkpoint's). The order a checkpoint's
epoch was drawn in (meta.json's data_order) is continued mid-epoch: another one (shards
indexed or unindexed since, a multi-rank checkpoint from before data_order was recorded) is
refused unless the checkpoint sits at an epoch's end. Every engine resumes on
another world size: DeepSpeed's ZeRO 1/2/3 partitions are gathered whole from every old
rank's files and partitioned anew (scale/checkpoint_io/deepspeed.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale.checkpoint_io.directory import CheckpointError
from scale.config import to_dict
from scale.data.base import GLOBAL_BATCH_SLICES, INDEXED_SHARD_WINDOWS, STREAM

from conftest import REPO, python_env, tiny_config

SEGMENT = REPO / "tests" / "dist_scripts" / "elastic_resume.py"
# Global batch 12 splits over 1, 2, 3 and 4 ranks; micro-batches of 4 make 1 and 2 ranks run gradient
# caching (3 and 2 chunks) and 3 or 4 ranks one pass. Drop path draws per rank: off.
ELASTIC = ["train.global_batch=12", "train.micro_batch=4", "train.ckpt_every=1", "model.drop_path_rate=0",
           "optim.warmup_epochs=0", "optim.blr=0.02"]
# EHM with its masks cut from an EMA of the encoder (module buffers: resharded with the weights).
EHM_EMA = ["mask.name=ehm_two_group", "mask.ehm.source=ema", "mask.ehm.ema_decay=0.5", "mask.ehm.depth=fixed",
           "mask.ehm.fixed_depth=0.5"]
CHAIN = (4, 2, 1, 2, 3)  # 4 -> 2, 2 -> 1, 1 -> 2, 2 -> 3: one step each
LOSS_RTOL = 1e-5


def _meta(cfg, world_size: int, fmt: str = "torch", order: str = GLOBAL_BATCH_SLICES, step: int = 5) -> dict:
    return {"engine": cfg.engine.name, "checkpoint_format": fmt, "world_size": world_size, "data_order": order,
            "step": step}


# ----------------------------------------------------------------------------- the resume check

def test_world_size_and_workers_may_change_for_map_style_data(tmp_path):
    from scale.trainer.resume_check import check_resume_config

    saved = tiny_config(tmp_path, "train.global_batch=12", "data.num_workers=0")
    now = tiny_config(tmp_path, "train.global_batch=12", "data.num_workers=2")
    warnings = check_resume_config(to_dict(saved), now, _meta(saved, 4), "torch", 2, "ckpt")
    assert any("on 2 ranks (written on 4)" in w and "global batch 12 kept, 6 images per rank" in w
               for w in warnings), warnings
    # FSDP2's DCP checkpoints reshard on load too; 4 -> 3 with a batch of 12 is 4 images per rank.
    assert check_resume_config(to_dict(saved), now, _meta(saved, 4, "dcp"), "dcp", 3, "ckpt")
    # What changes shapes, masks or the sample order is still refused.
    with pytest.raises(CheckpointError, match=r"train\.global_batch: 12 -> 24"):
        check_resume_config(to_dict(saved), tiny_config(tmp_path, "train.global_batch=24"), _meta(saved, 4), "torch",
                            2, "ckpt")


def test_streaming_shards_refuse_another_world_size_or_worker_count(tmp_path):
    from scale.trainer.resume_check import check_resume_config

    saved = tiny_config(tmp_path, "train.global_batch=12", "data.num_workers=1")
    with pytest.raises(CheckpointError, match=r"world_size: 4 -> 2 \(changes the data order: .*indexed shards"):
        check_resume_config(to_dict(saved), saved, _meta(saved, 4, order=STREAM), "torch", 2, "ckpt", STREAM, 8)
    with pytest.raises(CheckpointError, match=r"data\.num_workers: 1 -> 2"):
        check_resume_config(to_dict(saved), tiny_config(tmp_path, "train.global_batch=12", "data.num_workers=2"),
                            _meta(saved, 4, order=STREAM), "torch", 4, "ckpt", STREAM, 8)


def test_another_data_order_is_refused_mid_epoch_and_accepted_at_an_epochs_end(tmp_path):
    """Shards indexed (or their indexes lost) between two allocations: the checkpoint's epoch is continued
    in its own order, so the switch waits for an epoch's end (8 steps an epoch here)."""
    from scale.trainer.resume_check import check_resume_config

    cfg = tiny_config(tmp_path, "train.global_batch=12")
    for old, new, how in ((STREAM, INDEXED_SHARD_WINDOWS, "move the shards' NAME.tar.idx.json indexes aside"),
                          (INDEXED_SHARD_WINDOWS, STREAM, "rebuild the shards' indexes")):
        with pytest.raises(CheckpointError) as err:
            check_resume_config(to_dict(cfg), cfg, _meta(cfg, 1, order=old, step=13), "torch", 1, "ckpt", new, 8)
        message = str(err.value)
        assert "\n" not in message and f"data_order: {old!r} -> {new!r}" in message, message
        assert "resume_allow_changes" not in message  # no config key: the way out is the epoch's end or the index
        assert "step 13 is in the middle of epoch 1" in message and "(step 8 or 16)" in message and how in message
        assert check_resume_config(to_dict(cfg), cfg, _meta(cfg, 1, order=old, step=16), "torch", 1, "ckpt", new,
                                   8) == []


def test_a_stream_checkpoint_does_not_resume_on_another_world_size_once_the_shards_are_indexed(tmp_path):
    """The world size is judged by the order the rest of the epoch is drawn in: the checkpoint's mid-epoch
    (an indexed reader now does not make the stream's epoch elastic), this run's at an epoch's end."""
    from scale.trainer.resume_check import check_resume_config

    cfg = tiny_config(tmp_path, "train.global_batch=12")
    with pytest.raises(CheckpointError, match=r"world_size: 8 -> 4 \(changes the data order: the epoch is drawn in "
                                              r"order 'stream'.*data_order: 'stream' -> 'indexed-shard windows'"):
        check_resume_config(to_dict(cfg), cfg, _meta(cfg, 8, order=STREAM, step=13), "torch", 4, "ckpt",
                            INDEXED_SHARD_WINDOWS, 8)
    warnings = check_resume_config(to_dict(cfg), cfg, _meta(cfg, 8, order=STREAM, step=16), "torch", 4, "ckpt",
                                   INDEXED_SHARD_WINDOWS, 8)
    assert any("on 4 ranks (written on 8)" in w for w in warnings), warnings
    # An indexed checkpoint whose shards are streamed now: the next epoch is a stream, dealt to this world size.
    with pytest.raises(CheckpointError, match=r"world_size: 4 -> 2 \(changes the data order: .*'stream'"):
        check_resume_config(to_dict(cfg), cfg, _meta(cfg, 4, order=INDEXED_SHARD_WINDOWS, step=16), "torch", 2,
                            "ckpt", STREAM, 8)


def test_a_multi_rank_checkpoint_from_before_data_order_resumes_only_at_an_epochs_end(tmp_path):
    """Written before issue 27 (no data_order): on several ranks each rank strode through the permutation with
    its own masks, an order no source draws today; on one rank it is today's order."""
    from scale.trainer.resume_check import check_resume_config

    cfg = tiny_config(tmp_path, "train.global_batch=12")
    old = {"engine": cfg.engine.name, "checkpoint_format": "torch", "world_size": 2, "step": 13}
    with pytest.raises(CheckpointError) as err:
        check_resume_config(to_dict(cfg), cfg, old, "torch", 2, "ckpt", GLOBAL_BATCH_SLICES, 8)
    message = str(err.value)
    assert "\n" not in message and "data_order: 'per-rank strides" in message, message
    assert "(step 8 or 16)" in message and "world_size" not in message  # the same world size: only the order
    assert check_resume_config(to_dict(cfg), cfg, {**old, "step": 16}, "torch", 2, "ckpt", GLOBAL_BATCH_SLICES, 8) == []
    assert check_resume_config(to_dict(cfg), cfg, {**old, "world_size": 1}, "torch", 1, "ckpt", GLOBAL_BATCH_SLICES,
                               8) == []
    # A one-rank webdataset checkpoint from then was a stream: indexed shards now continue it only at an epoch's end.
    shards = dict(to_dict(cfg), data={**to_dict(cfg)["data"], "name": "webdataset"})
    with pytest.raises(CheckpointError, match=r"data_order: 'stream' -> 'indexed-shard windows'"):
        check_resume_config(shards, cfg, {**old, "world_size": 1}, "torch", 1, "ckpt", INDEXED_SHARD_WINDOWS, 8)


def test_read_meta_refuses_a_data_order_that_is_not_a_string(tmp_path):
    from scale.checkpoint_io.directory import META, read_meta

    (tmp_path / META).write_text(json.dumps({"step": 1, "files": {}, "data_order": 3}))
    with pytest.raises(CheckpointError, match=r"'data_order' must be a string \(the data order\) \(found: int 3\)"):
        read_meta(tmp_path)
    (tmp_path / META).write_text(json.dumps({"step": 1, "files": {}, "data_order": STREAM}))
    assert read_meta(tmp_path)["data_order"] == STREAM


def test_a_null_global_batch_is_refused_with_the_value_that_keeps_it(tmp_path):
    from scale.trainer.resume_check import check_resume_config

    saved = tiny_config(tmp_path, "train.micro_batch=6")  # global batch 6 x 2 ranks
    with pytest.raises(CheckpointError) as err:
        check_resume_config(to_dict(saved), saved, _meta(saved, 2), "torch", 4, "ckpt")
    message = str(err.value)
    assert "\n" not in message and "world_size: 2 -> 4" in message and "set train.global_batch=12" in message
    # Following the hint: the same 12 images per step, now 3 per rank on 4 ranks (a smaller micro-batch too).
    hinted = tiny_config(tmp_path, "train.global_batch=12", "train.micro_batch=2")
    assert check_resume_config(to_dict(saved), hinted, _meta(saved, 2), "torch", 4, "ckpt")
    with pytest.raises(CheckpointError, match=r"train\.global_batch: None -> 24"):
        check_resume_config(to_dict(saved), tiny_config(tmp_path, "train.global_batch=24"), _meta(saved, 2), "torch",
                            4, "ckpt")


def test_deepspeed_checkpoints_may_change_world_size_too(tmp_path):
    from scale.trainer.resume_check import check_resume_config

    saved = tiny_config(tmp_path, "engine.name=deepspeed", "engine.zero_stage=2", "train.global_batch=12")
    warnings = check_resume_config(to_dict(saved), saved, _meta(saved, 2, "deepspeed"), "deepspeed", 3, "ckpt")
    assert any("on 3 ranks (written on 2)" in w and "4 images per rank" in w for w in warnings), warnings
    assert check_resume_config(to_dict(saved), saved, _meta(saved, 2, "deepspeed"), "deepspeed", 2, "ckpt") == []
    # The zero stage stays what the checkpoint's partitions were written with.
    with pytest.raises(CheckpointError, match=r"engine\.zero_stage: 2 -> 3 \(changes the checkpoint format\)"):
        check_resume_config(to_dict(saved), tiny_config(tmp_path, "engine.name=deepspeed", "engine.zero_stage=3",
                                                        "train.global_batch=12"),
                            _meta(saved, 2, "deepspeed"), "deepspeed", 3, "ckpt")


@pytest.mark.slow
def test_the_trainer_asks_its_data_whether_the_order_survives_another_world_size(tmp_path):
    """The trainer records its data's order in meta.json; a checkpoint recorded as written on 2 ranks, resumed in
    one process: accepted for a source in the same order, refused for one in another (PretrainData.order, e.g. a
    shard stream) mid-epoch, and for a checkpoint whose recorded order is a stream."""
    from scale.checkpoint_io.directory import META
    from scale.data import build_dataset
    from scale.trainer import Trainer

    overrides = ("train.global_batch=4", "train.ckpt_every=1")
    Trainer(tiny_config(tmp_path, *overrides, "train.max_steps=1")).fit()
    meta_file = next((tmp_path / "run" / "checkpoints").glob(f"step_*/{META}"))
    meta = json.loads(meta_file.read_text())
    assert meta["data_order"] == GLOBAL_BATCH_SLICES
    meta_file.write_text(json.dumps({**meta, "world_size": 2}))
    cfg = tiny_config(tmp_path, *overrides, "train.max_steps=2", "train.resume=auto")
    streaming = build_dataset(cfg.data, 28, 1)
    streaming.order = STREAM
    with pytest.raises(CheckpointError, match=r"data_order: 'global-batch slices' -> 'stream' \(changes the order of "
                                              r"the rest of the epoch.*step 1 is in the middle of epoch 0"):
        Trainer(cfg, data=streaming).maybe_resume()
    meta_file.write_text(json.dumps({**meta, "world_size": 2, "data_order": STREAM}))
    with pytest.raises(CheckpointError, match=r"world_size: 2 -> 1 \(changes the data order: .*'stream'"):
        Trainer(cfg).maybe_resume()
    meta_file.write_text(json.dumps({**meta, "world_size": 2}))
    trainer = Trainer(cfg)
    assert trainer.maybe_resume() is not None and trainer.step == 1


# ----------------------------------------------------------------------------- runs on 4, 2, 1, 2, 3 ranks

def _segment(out: Path, label: str, world: int, until: int, engine: str, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(SEGMENT), "--out", str(out), "--label", label, "--until", str(until)]
    for override in (f"engine.name={engine}", *ELASTIC, *overrides):
        cmd += ["--set", override]
    env = python_env({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{label}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out / f"{label}.json").read_text())


def _assert_same_state(saved: dict, loaded: dict, label: str) -> None:
    assert loaded["step"] == saved["step"] and loaded["lr"] == saved["lr"], label
    for part in ("model", "moments"):
        assert sorted(loaded[part]) == sorted(saved[part]), (label, part)
        for key, value in saved[part].items():
            same = torch.equal(loaded[part][key], value) if torch.is_tensor(value) else loaded[part][key] == value
            assert same, (label, key)
    assert "objective.log_temperature" in saved["model"] and "objective.log_temperature/exp_avg" in saved["moments"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.long
@pytest.mark.parametrize("engine,method", [
    ("auto", "ocl"), ("fsdp", "ocl"),  # auto: single on 1 rank, ddp on more (both torch files)
    ("fsdp", "ehm_ema"),  # EHM's masks from an EMA of the encoder: the EMA (module buffers) is resharded too
])
def test_a_run_continues_on_4_2_1_2_3_ranks_like_one_uninterrupted_run(engine, method, tmp_path):
    from scale.trainer import Trainer

    overrides = EHM_EMA if method == "ehm_ema" else ()
    reference = Trainer(tiny_config(tmp_path / "reference", *ELASTIC, *overrides,
                                    f"train.max_steps={len(CHAIN)}")).fit()
    losses, previous = [], None
    for step, world in enumerate(CHAIN):
        label = f"segment{step}_x{world}"
        result = _segment(tmp_path, label, world, step + 1, engine, *overrides)
        assert result["world_size"] == world and result["started"] == step and result["final_step"] == step + 1
        assert result["per_rank_batch"] == 12 // world and result["chunks"] == -(-(12 // world) // 4)
        if previous is not None:  # what the last segment saved is what this one loaded
            _assert_same_state(torch.load(tmp_path / f"{previous}_end.pt"), torch.load(tmp_path / f"{label}_loaded.pt"),
                               label)
        losses += result["losses"]
        previous = label
    if method == "ehm_ema":  # the EMA was compared like the weights at every reload above, and it moved
        first, last = (torch.load(tmp_path / f"{name}_end.pt")["model"] for name in (f"segment0_x{CHAIN[0]}", previous))
        ema = [k for k in first if k.startswith("signal_ema.model.")]
        assert ema and not all(torch.equal(first[k], last[k]) for k in ema)
    assert len(losses) == len(reference.losses) == len(CHAIN)
    assert losses == pytest.approx(reference.losses, rel=LOSS_RTOL)


# ----------------------------------------------------------------------------- DeepSpeed ZeRO on 2, 1, 3 ranks

DS_CHAIN = (2, 1, 3)  # 2 -> 1 (shrink), 1 -> 3 (grow, a partition count that does not divide the old one)


def _zero_files(stage: int, full: dict, moments: dict, frozen: torch.Tensor, buffer: torch.Tensor):
    """The loaded contents of a ZeRO checkpoint written on 2 ranks, laid out as DeepSpeed lays it out: stage 2
    concatenates each group's parameters and cuts the (aligned) flat in equal parts, saving the last rank's
    fp32 part without its padding and its AdamW state with it; stage 3 pads and cuts each parameter."""
    from deepspeed.checkpoint.constants import (BASE_OPTIMIZER_STATE, BUFFER_NAMES, FP32_FLAT_GROUPS,
                                                FROZEN_PARAM_FRAGMENTS, FROZEN_PARAM_SHAPES, OPTIMIZER_STATE_DICT,
                                                PARAM_SHAPES, SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE)

    groups = [["a", "b"], ["c"]]
    hyper = [{"lr": 0.1, "weight_decay": 0.05}, {"lr": 0.1, "weight_decay": 0.0}]

    def cut(tensors: dict, rank: int) -> list:
        if stage == 3:  # one flat per group: every parameter's own part, padded to 2 equal parts
            parts = []
            for names in groups:
                pieces = []
                for name in names:
                    flat = tensors[name].reshape(-1)
                    size = -(-flat.numel() // 2)
                    pieces.append(torch.nn.functional.pad(flat, (0, 2 * size - flat.numel()))[rank * size:][:size])
                parts.append(torch.cat(pieces))
            return parts
        parts = []
        for names in groups:
            flat = torch.cat([tensors[name].reshape(-1) for name in names])
            size = -(-flat.numel() // 4) * 2  # aligned to 2 x 2 ranks, then halved
            parts.append(torch.nn.functional.pad(flat, (0, 2 * size - flat.numel()))[rank * size:][:size])
        return parts

    model_states, optim_states = [], []
    for rank in range(2):
        fp32, exp_avg, exp_avg_sq = cut(full, rank), cut(moments["exp_avg"], rank), cut(moments["exp_avg_sq"], rank)
        if stage < 3:  # the last rank's fp32 part is saved without the alignment padding
            fp32 = [part[:sum(full[name].numel() for name in names) - rank * part.numel()] if rank else part
                    for part, names in zip(fp32, groups)]
        base = {"state": {g: {"step": torch.tensor(7.0), "exp_avg": exp_avg[g], "exp_avg_sq": exp_avg_sq[g]}
                          for g in range(len(groups))},
                "param_groups": [{**h, "params": [g]} for g, h in enumerate(hyper)]}
        optim_states.append({OPTIMIZER_STATE_DICT: {
            ZERO_STAGE: stage, **({SINGLE_PARTITION_OF_FP32_GROUPS: fp32, BASE_OPTIMIZER_STATE: base} if stage < 3
                                  else {FP32_FLAT_GROUPS: fp32, OPTIMIZER_STATE_DICT: base})}})
        frozen_part = frozen[rank:rank + 1] if stage == 3 else frozen  # stage 3 partitions frozen parameters too
        model_states.append({"module": {"buf": buffer, "frozen": frozen_part}, BUFFER_NAMES: ["buf"],
                             PARAM_SHAPES: [{name: full[name].shape for name in names} for names in groups],
                             FROZEN_PARAM_SHAPES: {"frozen": frozen.shape},
                             FROZEN_PARAM_FRAGMENTS: {"frozen": frozen_part}, "shared_params": {}})
    return (model_states if stage == 3 else model_states[:1]), optim_states, hyper


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_partitions_written_on_two_ranks_are_gathered_whole(stage):
    """The layout reconstruction behind DeepSpeed's resume on another world size, from synthetic partitions:
    each parameter's fp32 master weight and AdamW moments come back whole and exact, with the step and the
    groups' hyper-parameters, the frozen parameter and the buffer."""
    pytest.importorskip("deepspeed")
    from scale.checkpoint_io.deepspeed import gather_zero_state

    g = torch.Generator().manual_seed(0)
    shapes = {"a": (3,), "b": (2, 2), "c": (3,)}  # 7 and 3 elements: both groups need padding on 2 ranks

    def values() -> dict:
        return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}

    full, moments = values(), {"exp_avg": values(), "exp_avg_sq": values()}
    frozen, buffer = torch.randn(2, generator=g), torch.arange(3)
    model_states, optim_states, hyper = _zero_files(stage, full, moments, frozen, buffer)
    state = gather_zero_state(model_states, optim_states)
    assert state.zero_stage == stage and state.param_groups == hyper
    assert sorted(state.scalars) == ["step"] and float(state.scalars["step"]) == 7.0
    assert sorted(state.module) == ["a", "b", "buf", "c", "frozen"] and sorted(state.optimizer) == ["a", "b", "c"]
    for name in shapes:
        assert torch.equal(state.module[name], full[name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state.optimizer[name][key], moments[key][name]), (name, key)
    assert torch.equal(state.module["frozen"], frozen) and torch.equal(state.module["buf"], buffer)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.long
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_continues_on_2_1_3_ranks_like_one_uninterrupted_run(stage, tmp_path):
    """A ZeRO checkpoint written on 2 ranks resumes on 1, and that one's on 3: after each load the fp32
    master weights, AdamW moments and step, learning rates and the module equal what the last segment saved,
    and the losses equal one uninterrupted run's (fp32, drop path off)."""
    pytest.importorskip("deepspeed")
    from scale.trainer import Trainer

    reference = Trainer(tiny_config(tmp_path / "reference", *ELASTIC, f"train.max_steps={len(DS_CHAIN)}")).fit()
    losses, previous = [], None
    for step, world in enumerate(DS_CHAIN):
        label = f"zero{stage}_segment{step}_x{world}"
        result = _segment(tmp_path, label, world, step + 1, "deepspeed", f"engine.zero_stage={stage}",
                          "train.precision=fp32")
        assert result["world_size"] == world and result["started"] == step and result["final_step"] == step + 1
        assert result["per_rank_batch"] == 12 // world
        if previous is not None:
            saved, loaded = torch.load(tmp_path / f"{previous}_end.pt"), torch.load(tmp_path / f"{label}_loaded.pt")
            _assert_same_state(saved, loaded, label)
            assert "objective.log_temperature/fp32" in saved["moments"] and saved["moments"]["step"] == [step]
        losses += result["losses"]
        previous = label
    assert losses == pytest.approx(reference.losses, rel=LOSS_RTOL)
