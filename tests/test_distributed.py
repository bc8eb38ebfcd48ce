"""Multi-process training: process groups, global negatives, DDP / FSDP2 / DeepSpeed, gradient
caching, launchers (torchrun, accelerate launch, SLURM-style environment).

Every multi-process check runs real processes (gloo on CPU, 2 ranks). One launch per engine
runs several checks (tests/dist_scripts/worker.py writes JSON per rank, read here), so the
whole file stays within a few minutes on 2 cores.
"""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale.config import ConfigError, load_config
from scale.engine import EngineRun, GradCache, SingleProcessEngine, plan_batch
from scale.engine.deepspeed_engine import deepspeed_config
from scale.engine.distributed import (DistributedEnvError, enable_method_dispatch, first_slurm_host,
                                      launcher_engine_name, promote_scalar_parameters, read_dist_env)
from scale.masking import MaskContext, Masks, build_mask_generator
from scale.pretraining import build_pretrain_module
from scale.trainer.optim import build_optimizer

from conftest import REPO, TINY_OVERRIDES, python_env, tiny_config

pytestmark = pytest.mark.distributed

WORKER = REPO / "tests" / "dist_scripts" / "worker.py"
MEMORY = REPO / "tests" / "dist_scripts" / "grad_cache_memory.py"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST",
               "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
               "ACCELERATE_DEEPSPEED_ZERO_STAGE")
# The DDP run of the worker's `train` scenario, as command-line overrides (for scale.train).
TRAIN_OVERRIDES = [*TINY_OVERRIDES, "train.micro_batch=16", "train.max_steps=4", "train.ckpt_every=2"]
LOSS_TOL = 1e-5


# ----------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: dict | None = None) -> dict:
    env = python_env({"OMP_NUM_THREADS": "1", "SCALE_TEST_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    for name in LAUNCH_VARS:
        env.pop(name, None)
    env.update(extra or {})
    return env


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def torchrun_worker(out: Path, scenarios: str, engine: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), scenarios, "--engine", engine, "--out", str(out), *extra]
    check(subprocess.run(cmd, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=400))
    return {(scenario, rank): json.loads((out / f"{scenario}_{engine}_rank{rank}.json").read_text())
            for scenario in scenarios.split(",") for rank in (0, 1)}


def jsonl_losses(run_dir: Path) -> list:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return torchrun_worker(tmp_path_factory.mktemp("ddp"), "grads,train", "ddp")


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return torchrun_worker(tmp_path_factory.mktemp("fsdp"), "grads,train", "fsdp")


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory):
    # ZeRO 1, 2, 3 in one launch (DeepSpeed's import is slow), all under gradient caching:
    # the curves must still equal DDP's without it. 3 steps, resume from step 2.
    return torchrun_worker(tmp_path_factory.mktemp("deepspeed"), "train", "deepspeed", "--steps", "3",
                           "--set", "train.micro_batch=6")


# ----------------------------------------------------------------------------- process-group environment

def test_env_from_torchrun_accelerate_and_slurm():
    env = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == \
        (3, 8, 1, "n1", 29500, "torchrun")
    env = read_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                         "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 8, 1, "slurm")
    assert env.master_addr == "gpu017" and env.master_port == 20000 + 4242
    # torchrun's variables win over an enclosing SLURM allocation's (torchrun inside sbatch).
    env = read_dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "1",
                         "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"})
    assert (env.rank, env.world_size, env.launcher) == (1, 2, "torchrun")
    assert read_dist_env({}).world_size == 1
    assert first_slurm_host("node7") == "node7" and first_slurm_host("a[1,3-4],b2") == "a1"


@pytest.mark.parametrize("env, missing", [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "LOCAL_RANK"),
    ({"RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "1"}, "MASTER_ADDR"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, "MASTER_PORT"),
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, "SLURM_NTASKS"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "MASTER_PORT": "1"}, "MASTER_ADDR"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK"),
])
def test_env_errors_name_the_variable(env, missing):
    with pytest.raises(DistributedEnvError, match=missing):
        read_dist_env(env)


def test_auto_engine_follows_the_launcher():
    assert launcher_engine_name({}) == "single"
    assert launcher_engine_name({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                                 "MASTER_PORT": "1"}) == "ddp"
    assert launcher_engine_name({"ACCELERATE_USE_FSDP": "true"}) == "fsdp"
    assert launcher_engine_name({"ACCELERATE_USE_DEEPSPEED": "true"}) == "deepspeed"


# ----------------------------------------------------------------------------- batch plan and configs

def test_global_batch_splits_evenly_over_ranks(tmp_path):
    # How the ViT-B recipe reaches the paper's 9,600 negatives on any GPU count (docs/distributed.md).
    vitb = REPO / "recipes" / "ocl_vitb16.yaml"
    overrides = ["train.global_batch=9600", "train.micro_batch=300"]
    cfg = load_config(vitb, overrides) if vitb.is_file() else tiny_config(tmp_path, *overrides)
    assert cfg.train.global_batch == 9600 and cfg.train.micro_batch
    for world in (1, 2, 4, 8, 16, 32, 64):  # 9,600 negatives whatever the GPU count
        plan = plan_batch(cfg.train, world)
        assert plan.global_batch == 9600 and plan.per_rank_batch == 9600 // world
        chunked = plan.per_rank_batch > 300  # 32+ GPUs: 300 per GPU fits, no caching needed
        assert plan.chunk == (300 if chunked else None) and plan.num_chunks == -(-plan.per_rank_batch // 300)
    with pytest.raises(ConfigError, match="9600.*7 ranks"):
        plan_batch(cfg.train, 7)
    plain = tiny_config(tmp_path).train
    assert plan_batch(plain, 4).global_batch == plain.micro_batch * 4 and plan_batch(plain, 4).chunk is None
    with pytest.raises(ConfigError, match="micro_batch"):
        tiny_config(tmp_path, "train.micro_batch=0")


def test_deepspeed_json_recipes_are_filled_from_the_run_config(tmp_path):
    for stage in (1, 2, 3):
        cfg = tiny_config(tmp_path, f"engine.zero_stage={stage}", "optim.clip_grad=1.5", "train.global_batch=64")
        plan = plan_batch(cfg.train, 2)
        ds = deepspeed_config(cfg.engine, EngineRun.of(cfg), plan, torch.device("cpu"))
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["train_batch_size"] == 64
        assert ds["gradient_clipping"] == 1.5 and ds["gradient_accumulation_steps"] == 1
        assert ds["torch_autocast"]["enabled"] is False and ds["zero_optimization"]["overlap_comm"] is False  # CPU
        assert ds["bf16"]["enabled"] is False  # parameters stay fp32; bf16 is autocast only
    cfg = tiny_config(tmp_path, "train.precision=auto")
    assert deepspeed_config(cfg.engine, EngineRun.of(cfg), plan_batch(cfg.train, 1), torch.device("cuda", 0))["torch_autocast"]["enabled"] is True
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 7, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        bad_cfg = tiny_config(tmp_path, f"engine.deepspeed_config={bad}")
        deepspeed_config(bad_cfg.engine, EngineRun.of(bad_cfg), plan, torch.device("cpu"))


# ----------------------------------------------------------------------------- gradient caching, one process

class RecordingEngine(SingleProcessEngine):
    """Records each `encode` output's CLS of a gradient-cached step (first pass without grad, then with)."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.embeddings = []

    def invoke(self, method, *args):
        out = getattr(self.module, method)(*args)
        if method == "encode":
            self.embeddings.append(out.cls.detach().clone())
        return out


@pytest.mark.parametrize("overrides", [(), ("objective.head.layers=2", "model.drop_path_rate=0.3")])
def test_grad_cache_gradient_equals_full_batch(tmp_path, overrides):
    cfg = tiny_config(tmp_path, "train.global_batch=20", "train.micro_batch=6", *overrides)
    torch.manual_seed(0)
    module = build_pretrain_module(cfg)
    init = {k: v.clone() for k, v in module.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    images = torch.randn(20, 1, 28, 28, generator=g)
    masks = build_mask_generator(cfg.mask, module.encoder.spec.grid_size)(20, MaskContext(g, torch.device("cpu")))

    engine = RecordingEngine()
    plan = plan_batch(cfg.train, 1, module.objective.couples_batch)
    assert plan.chunk == 6 and plan.num_chunks == 4
    engine.setup(module, lambda m: build_optimizer(m, cfg.optim, 1e-3), plan)
    torch.manual_seed(5)
    out = GradCache(engine, chunk=plan.chunk)(images, masks, contextlib.nullcontext)  # chunks of 6, 6, 6, 2
    cached = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    first, second = engine.embeddings[:4], engine.embeddings[4:]
    # The second pass replays the first pass's masks and RNG (drop-path) exactly.
    assert len(second) == 4 and all(torch.equal(a, b) for a, b in zip(first, second))

    ref = build_pretrain_module(cfg)
    ref.load_state_dict(init)
    if not cfg.model.drop_path_rate:  # drop-path draws differ between one pass and chunks: compare grads only without it
        ref_out = ref(images, masks)
        ref_out.loss.backward()
        assert abs(out.loss.item() - ref_out.loss.item()) < 1e-6
        ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        assert sorted(ref_grads) == sorted(cached)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(cached[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    else:  # the objective's parameters (head, temperature) got gradients from the full-batch loss
        assert any(n.startswith("objective.head") for n in cached) and "objective.log_temperature" in cached


def test_method_dispatch_keeps_state_dict_keys(tmp_path):
    module = build_pretrain_module(tiny_config(tmp_path))
    keys = list(module.state_dict())
    enable_method_dispatch(module)
    promote_scalar_parameters(module)
    assert list(module.state_dict()) == keys and module.objective.log_temperature.shape == (1,)
    images = torch.randn(2, 1, 28, 28)
    every_patch = Masks(torch.arange(module.encoder.spec.num_patches).expand(2, 1, -1))  # one group: all patches
    emb = module(images, every_patch, method="encode").cls
    assert emb.shape == (2, 1, 192) and torch.equal(emb, module.encode(images, every_patch).cls)
    torch.testing.assert_close(emb, module.encoder(images, None), rtol=0, atol=0)


@pytest.mark.long
def test_grad_cache_memory_stays_flat(tmp_path):
    """Peak RSS rise of one step: 4x the contrastive batch at a fixed chunk costs (almost)
    nothing more, while the same batch in one pass costs several times as much."""
    runs = {"small": ["32", "8"], "large": ["128", "8"], "one_pass": ["128"]}
    procs = {k: subprocess.Popen([sys.executable, str(MEMORY), str(tmp_path / k), *a], env=clean_env(), cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k, a in runs.items()}
    rise = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-4000:]
        rise[k] = json.loads(stdout.strip().splitlines()[-1])
    assert rise["large"]["chunks"] == 16 and rise["one_pass"]["chunks"] == 1
    assert abs(rise["large"]["loss"] - rise["one_pass"]["loss"]) < 1e-5  # same batch, same masks, same loss
    growth_cached = rise["large"]["rise_kb"] - rise["small"]["rise_kb"]
    growth_one_pass = rise["one_pass"]["rise_kb"] - rise["small"]["rise_kb"]
    assert growth_one_pass > 100_000, rise  # the activations of 128 images in one pass: hundreds of MB
    assert growth_cached < 0.2 * growth_one_pass, rise


# ----------------------------------------------------------------------------- global negatives, 2 ranks

@pytest.mark.long
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_global_negatives_match_one_process_on_the_concatenated_batch(engine, ddp_results, fsdp_results):
    results = {"ddp": ddp_results, "fsdp": fsdp_results}[engine][("grads", 0)]
    assert results["world_size"] == 2
    for mode in ("full", "grad_cache"):  # grad_cache: chunks of 3 of each rank's 8 images
        r = results[mode]
        assert not r["missing"] and not r["extra"] and r["num_grads"] > 50, r
        assert abs(r["loss"] - r["ref_loss"]) < 1e-5, (mode, r)
        assert r["max_rel_diff"] < 1e-4, (mode, r)  # every parameter, relative to its largest entry
        assert abs(r["temperature_grad"] - r["ref_temperature_grad"]) < 1e-5 * max(1, abs(r["ref_temperature_grad"]))
    # Gradients are synchronised once per step: as many reductions with 3 chunks + the
    # loss backward as with one plain backward (DDP buckets / FSDP2 reduce-scatters).
    syncs = results["syncs"]
    assert syncs["full"] > 0 and syncs["grad_cache"] == syncs["full"], syncs


# ----------------------------------------------------------------------------- engines: curves, resume, export

@pytest.mark.long
def test_engines_train_like_ddp_resume_exactly_and_export(ddp_results, fsdp_results, deepspeed_results):
    ddp = ddp_results[("train", 0)]["ddp"]
    assert ddp["world_size"] == 2 and len(ddp["losses"]) == 4
    runs = {"ddp": ddp, "fsdp": fsdp_results[("train", 0)]["fsdp"],
            **{k: v for k, v in deepspeed_results[("train", 0)].items() if k.startswith("deepspeed")}}
    assert sorted(runs) == ["ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]
    for name, run in runs.items():
        n = len(run["losses"])
        assert run["losses"] == pytest.approx(ddp["losses"][:n], abs=LOSS_TOL), name
        # Resumed from the step-2 checkpoint: the next losses equal the uninterrupted run's.
        assert run["resumed_from"] == n and run["resumed_losses"] == pytest.approx(run["losses"][2:], abs=1e-6), name
        assert run["export_keys_match"] and run["export_shapes_match"] and run["export_is_plain"], name
        assert run["export_matches_checkpoint_weights"], name
    # The logged loss is the global one: the same on both ranks.
    assert ddp_results[("train", 1)]["ddp"]["losses"] == pytest.approx(ddp["losses"], abs=1e-7)
    assert runs["deepspeed_zero2"]["last_metrics"]["micro_batches"] == 3  # 16 per rank in chunks of 6


@pytest.mark.long
def test_step_metrics_report_batch_world_and_timings(ddp_results):
    m = ddp_results[("train", 0)]["ddp"]["last_metrics"]
    assert m["global_batch"] == 32 and m["world_size"] == 2 and m["micro_batches"] == 1
    for key in ("time_allgather_s", "time_optimizer_s", "time_compute_s", "time_step_s"):
        assert m[key] > 0, (key, m)
    assert m["time_allgather_s"] + m["time_optimizer_s"] + m["time_compute_s"] == pytest.approx(m["time_step_s"], rel=1e-6)


# ----------------------------------------------------------------------------- launchers

@pytest.mark.long
def test_accelerate_launch_matches_torchrun(ddp_results, tmp_path):
    out = tmp_path / "accelerate"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/ddp.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "scale.train",
           *TRAIN_OVERRIDES, "engine.name=auto", f"train.output_dir={out}"]
    proc = check(subprocess.run(cmd, env=clean_env({"ACCELERATE_USE_CPU": "1"}), cwd=REPO, capture_output=True,
                                text=True, timeout=300))
    assert "engine ddp x2" in proc.stdout + proc.stderr
    assert jsonl_losses(out) == pytest.approx(ddp_results[("train", 0)]["ddp"]["losses"], abs=LOSS_TOL)


@pytest.mark.long
def test_slurm_environment_launch(ddp_results, tmp_path):
    """Two tasks as srun starts them: SLURM_PROCID/NTASKS/LOCALID only; the master address
    comes from SLURM_JOB_NODELIST and the port from SLURM_JOB_ID."""
    out = tmp_path / "slurm"
    port = free_port()
    while port < 20000 or port >= 40000:
        port = free_port()
    procs = []
    for rank in range(2):
        env = clean_env({"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                         "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(port - 20000)})
        procs.append(subprocess.Popen([sys.executable, "-m", "scale.train", *TRAIN_OVERRIDES, "train.max_steps=2",
                                       f"train.output_dir={out}"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-4000:]
    assert "engine ddp x2" in outputs[0][0] + outputs[0][1]
    assert jsonl_losses(out) == pytest.approx(ddp_results[("train", 0)]["ddp"]["losses"][:2], abs=LOSS_TOL)
