"""Every check that needs CUDA, in one command: a fixed-width table on stdout and a JSON file.

On the GPU machine (repo root), the one command, as run on an H200 on 2026-11-30 (docs/throughput.md),
with timm 1.0.31, webdataset 1.0.2 and braceexpand 0.1.7 carried as wheels in .whl/ (see "Packages"):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/webdataset*.whl .whl/braceexpand*.whl .whl/timm*.whl && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 -m bench.gpu_check

(JSON to $OUT/gpu_check.json when OUT is set, else ./gpu_check.json; the children's logs beside it as
gpu_check.log). Under 9 minutes: `--budget-s 540` is the default. Without CUDA it says so in one line and
exits 2; `--device cpu --smoke` runs every check with tiny shapes on the CPU (tests/test_gpu_check.py).

Checks, in order, each in its own child process with its own time limit (a share of the budget plus what
earlier checks left unused; a check that fails or times out is reported FAILED with a one-line reason and
the others still run; rows stream into the table and the JSON as they finish):

  attention   xFormers vs SDPA vs math attention (scale/models/attention.py's BackendAttention, the
              layer the model runs) on the recipes' real shapes: ViT-B/16 and ViT-L/16 at 224 with the
              OCL and MAE visible-token counts at the recipes' micro-batches (and MAE's decoder over all
              197 tokens); fp32 and bf16 autocast; max abs error of the output and of the gradients
              (input, qkv and proj weights) against math attention in fp32 (TF32 off). xFormers missing
              is reported as 'not installed'.
  parity      bf16 vs fp32 loss over 50 steps of the trainer's own `Trainer.train_step` (single engine),
              OCL and MAE, ViT-S/16 at 224, the same seed and the same 50 batches (drawn once from the
              synthetic data pipeline); max relative loss difference against PARITY_RTOL. The steps after
              the first that do not log run under torch.cuda.set_sync_debug_mode("error"): a host sync fails it.
  flop_ratio  bench/train_step.py's measurement (`run_child`): train-step model FLOP/s over a bf16
              4096^3 GEMM's FLOP/s, for OCL ViT-B/16, OCL ViT-L/16 and MAE ViT-B/16 at their recipes'
              micro-batches, 3 warm-up + 10 timed steps, each in a fresh process.
  fsdp        FSDP2 on one GPU through `Trainer.fit` (engine fsdp, world size 1, nccl): 3 steps with a
              checkpoint, a resumed run to step 5 (`train.resume=auto`), an uninterrupted run to step 5;
              losses finite, checkpoint saved and resumed, resumed losses vs uninterrupted ones.
  memory      torch.cuda.max_memory_allocated over 1 + 2 train steps at each paper recipe's micro-batch
              (ocl_vitb16/l16/h16, mae_vitb16/l16), with the recipe's precision, activation checkpointing
              and compile settings, two micro-batches per step (gradient caching for OCL, accumulation for
              MAE), via bench/train_step.py's `run_child`; OCL rows also give train_step's estimate.
  ehm         Evolved Hierarchical Masking's cost: bench/ehm_cost.py's `measure` (MAE ViT-B/16, batch 256, the
              recipe's bf16, 3 warm-up + 10 timed steps of a random-mask and an EHM trainer, interleaved):
              signal / step, tree / step, EHM step / random step, greedy / rnn tree time and rounds; the two
              tree builders' trees must be identical.
  decode      the data path (bench/loader_throughput.py): 1024 full-size (500x375) JPEGs through one
              DataLoader worker three ways: the previous float path, the uint8 crop-aware CPU path, and
              data.decode=gpu (the worker reads headers, nvJPEG decodes, crops and flips on the GPU); img/s
              per worker core, nvJPEG vs CPU pixels (mean and max levels of 255), and the cores per GPU
              OCL / MAE need at ViT-B and ViT-L from this run's flop_ratio rows. Needs the webdataset wheel.

`--tune` (instead of the checks, at most 480 s) measures and chooses: OCL ViT-B/16, OCL ViT-L/16 and MAE
ViT-B/16 each as its recipe, then with one factor changed (compile; micro-batches up to train.micro_batch:
auto's largest; SDPA's flash / memory-efficient / cuDNN kernel and xFormers; fused vs foreach AdamW;
activation checkpointing), each case bench/train_step.py's child with its own time limit; it prints the
table of train-step FLOP/s over the bf16 GEMM of each case's process and the overrides that win.
`--profile` writes per recipe the top 15 CUDA kernels by time and the host syncs per step
(docs/throughput.md, "GPU tuning").

`--device cpu --smoke` proves the code paths: vit_tiny_patch7_28 (28x28) for every model, micro-batch 4,
a 64-d MAE decoder, 3 parity steps, EHM cost at batch 4 over 1 warm-up + 2 steps, gloo instead of nccl,
memory as peak RSS, fp32 where the recipe's `precision: auto` resolves to it on CPU (parity still compares
bf16 with fp32). OMP_WAIT_POLICY=PASSIVE is
set for --device cpu (on a shared CPU, spinning OpenMP threads made each step ~100x slower).

Packages. The GPU image (/work/.library/device/KINDS.md) has torch, timm, pyyaml, tqdm, tensorboard,
pillow, torchvision, numpy; it lacks webdataset (and braceexpand), deepspeed and xformers. deepspeed is
imported lazily (no check uses it) and xformers is optional ('not installed'). Synthetic data needs no
webdataset (scale.data registers the WebDataset source lazily), so every check but the decode check's
loader row runs without it; the header says whether it imports. To have that row too, fill .whl/ here
(`echo /.whl/ >> .git/info/exclude`; then `python3 -m pip download --no-deps --only-binary=:all:
--python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl webdataset==1.0.2
braceexpand==0.1.7`, both pure-Python, ~70 kB), pass carry=[".whl"] and prefix the command with
`python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
&& export PYTHONPATH=/tmp/site;`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from bench.common import GIB, JPEG_SIZES, REPO, fmt_bytes, smooth_noise_image, sync, write_json
from bench.train_step import SDPA_KERNELS, ocl_tokens_per_image, run_child
from scale.config import load_config, to_dict
from scale.data import LoaderSpec, build_dataset
from scale.device import autocast_dtype
from scale.engine import plan_batch
from scale.engine.memory_plan import (MARGIN, encoder_stack, largest_micro_batch, param_count,
                                     pretrain_step_memory, step_memory)
from scale.masking import MaskContext, build_mask_generator
from scale.models import MODELS
from scale.models.attention import BackendAttention, xformers_available, xformers_problem
from scale.pretraining import build_pretrain_module
from scale.trainer import Trainer

CHECKS = ("attention", "parity", "flop_ratio", "fsdp", "memory", "ehm", "decode")
# --tune and --profile: measure the candidate settings and choose; the step's kernels and host syncs.
MODES = ("tune", "profile")
# Seconds of the budget each check may use (plus whatever earlier checks left unused); the checks' sum to 540,
# the modes' to 480 (--tune --profile: at most 8 minutes).
SHARES = {"attention": 45, "parity": 80, "flop_ratio": 100, "fsdp": 75, "memory": 100, "ehm": 85, "decode": 55,
          "tune": 400, "profile": 80}
TUNE_BUDGET_S = 480.0
# A tuned setting wins when its train-step ratio beats the recipe's own by more than this (relative): less is noise.
TUNE_MARGIN = 0.02
ATTN_RECIPES = ("ocl_vitb16", "ocl_vitl16", "mae_vitb16", "mae_vitl16")
RATIO_RECIPES = ("ocl_vitb16", "ocl_vitl16", "mae_vitb16")
MEMORY_RECIPES = ("ocl_vitb16", "ocl_vitl16", "ocl_vith16", "mae_vitb16", "mae_vitl16")
PARITY_RECIPES = ("ocl_vitb16", "mae_vitb16")
# Tolerances (stated in the table): attention errors relative to the fp32 math reference's largest
# magnitude; the bf16 loss relative to the fp32 loss at every one of the parity steps.
ATTN_RTOL = {"fp32": 1e-4, "bf16": 5e-2}
PARITY_RTOL = 2e-2
SMOKE_MODEL = ("model.name=vit_tiny_patch7_28",)
SMOKE_DECODER = ("objective.decoder.dim=64", "objective.decoder.depth=1", "objective.decoder.num_heads=2")
SMOKE_MICRO = 4
# bench/ehm_cost.py's measure(preset, batch, steps, device, warmup): MAE ViT-B/16 at mae_vitb16's micro-batch
# (two trainers at batch 256 in bf16: ~30 GiB); in smoke mode the tiny model at SMOKE_MICRO.
EHM_CASE = {"preset": "vit_base_patch16", "batch": 256, "steps": 10, "warmup": 3}
EHM_SMOKE = {"preset": "vit_tiny_patch7_28", "batch": SMOKE_MICRO, "steps": 2, "warmup": 1}


# ----------------------------------------------------------------------------- small helpers

def one_line(err: BaseException, limit: int = 240) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return (text[0] if text else type(err).__name__)[:limit]


def flops(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def webdataset_status() -> str:
    """What the header says about webdataset: its version, or that it does not import (then only the
    decode check's loader row, which reads shards, is skipped)."""
    try:
        import webdataset
    except ImportError:
        return "absent (synthetic data only)"
    return getattr(webdataset, "__version__", "installed")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def environment(device: str) -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "cuda_build": torch.version.cuda, "timm": package_version("timm"),
        "xformers": package_version("xformers"), "webdataset": package_version("webdataset"),
    }
    try:
        env["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = "unknown"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update({"gpu": props.name, "gpu_capability": f"sm_{props.major}{props.minor}",
                    "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1), "gpu_count": torch.cuda.device_count(),
                    "cudnn": torch.backends.cudnn.version()})
        try:
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, (tuple, list)) else str(version)
        except Exception as err:  # noqa: BLE001 (a header line, never a crash)
            env["nccl"] = one_line(err)
    else:
        env["gpu"] = None
    return env


# ----------------------------------------------------------------------------- child: shared context

class Context:
    """What a check's child knows: device, smoke or not, its deadline, where its rows go."""

    def __init__(self, device: str, smoke: bool, deadline: float, result_path: Path):
        self.device = torch.device(device)
        self.smoke = smoke
        self.deadline = deadline
        self.result_path = result_path
        self.result: Dict[str, Any] = {"rows": [], "done": False}
        self.tmp = result_path.parent / "work"  # inside the parent's temporary folder: removed even after a kill
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.report = ""  # the parent's JSON so far (earlier checks' rows), when it passes one

    def left(self) -> float:
        return self.deadline - time.time()

    def emit(self, row: Dict[str, Any]) -> None:
        self.result["rows"].append(row)
        write_json(self.result_path, self.result)

    def smoke_model(self, name: str) -> List[str]:
        """In smoke mode, the tiny model, and a tiny decoder where the recipe's objective has one (MAE, ASL:
        a decoder key on an OCL run is an error, as every key that would do nothing)."""
        if not self.smoke:
            return []
        objective = to_dict(load_config(REPO / "recipes" / f"{name}.yaml"))["objective"]
        return [*SMOKE_MODEL, *(SMOKE_DECODER if "decoder" in objective else ())]

    def recipe(self, name: str, *overrides: str):
        """The recipe's config; in smoke mode with the tiny model, decoder and micro-batch."""
        smoke = [f"train.global_batch={2 * SMOKE_MICRO}", f"train.micro_batch={SMOKE_MICRO}"] if self.smoke else []
        return load_config(REPO / "recipes" / f"{name}.yaml", [*self.smoke_model(name), *smoke, *overrides])

    def synthetic(self, cfg, batch: int, num_samples: int) -> List[str]:
        """Overrides that make a recipe train on the built-in synthetic data, one process, no workers."""
        chans = MODELS.build(cfg.model.name).in_chans
        return [f"train.device={self.device.type}", "data.name=synthetic", f"data.num_samples={num_samples}",
                "data.num_workers=0", f"data.mean={[0.5] * chans}", f"data.std={[0.25] * chans}",
                "train.global_batch=null", f"train.micro_batch={batch}",
                f"train.output_dir={self.tmp / 'unused'}"]

    def amp(self, cfg) -> str:
        """The precision the trainer computes in for this config on this device (`auto` resolved)."""
        return "bf16" if autocast_dtype(cfg.train.precision, self.device) is not None else "fp32"

    def guarded(self, case: str, fn: Callable[[], Dict[str, Any]]) -> None:
        """One row: fn's result, or FAILED with its one-line reason (the check goes on)."""
        started = time.time()
        try:
            row = fn()
        except Exception as err:  # noqa: BLE001 (one case failing must not stop the others)
            traceback.print_exc()
            row = {"status": "FAILED", "reason": one_line(err)}
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        row = {"case": case, "status": "ok", **row, "seconds": round(time.time() - started, 2)}
        self.emit(row)


def micro_batch(cfg) -> int:
    """Images one device passes at once: the recipe's train.micro_batch, else its whole per-device batch."""
    return cfg.train.micro_batch or plan_batch(cfg.train, 1).per_rank_batch


def visible_tokens(cfg, spec) -> Tuple[int, int]:
    """(groups, visible patches per group) that the recipe's mask generator draws."""
    gen = build_mask_generator(cfg.mask, spec.grid_size)
    ids = gen(1, MaskContext(generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))).group_ids
    return ids.shape[1], ids.shape[2]


# ----------------------------------------------------------------------------- check: attention

def attention_shapes(ctx: Context) -> List[Dict[str, Any]]:
    shapes = []
    for name in ATTN_RECIPES:
        cfg = ctx.recipe(name)
        spec = MODELS.build(cfg.model.name)
        groups, visible = visible_tokens(cfg, spec)
        micro = micro_batch(cfg)
        shapes.append({"recipe": name, "part": "encoder", "model": cfg.model.name, "dim": spec.embed_dim,
                       "heads": spec.num_heads, "seqs": micro * groups, "tokens": 1 + visible})
        if cfg.objective.name == "mae":
            dec = cfg.objective.decoder
            shapes.append({"recipe": name, "part": "decoder", "model": cfg.model.name, "dim": dec.dim,
                           "heads": dec.num_heads, "seqs": micro, "tokens": 1 + spec.num_patches})
    return shapes


def attention_layer(dim: int, heads: int, device):
    """scale's BackendAttention with the encoder's initialisation (MoCo v3 q/k/v bound, Xavier proj)."""
    layer = BackendAttention(dim, num_heads=heads, qkv_bias=True)
    with torch.no_grad():
        bound = math.sqrt(6.0 / float(layer.qkv.weight.shape[0] // 3 + layer.qkv.weight.shape[1]))
        nn.init.uniform_(layer.qkv.weight, -bound, bound)
        nn.init.xavier_uniform_(layer.proj.weight)
        nn.init.zeros_(layer.qkv.bias)
        nn.init.zeros_(layer.proj.bias)
    return layer.to(device).train()


def attention_pass(layer, x, upstream, backend: str, dtype) -> Tuple[Any, List[Any]]:
    """Output and gradients (input, qkv weight, proj weight) of one forward/backward, as the trainer
    runs it: fp32 parameters, bf16 autocast when dtype is bf16."""
    layer.backend = backend
    layer.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = layer(xi)
    (out.float() * upstream).sum().backward()
    grads = [xi.grad, layer.qkv.weight.grad, layer.proj.weight.grad]
    return out.detach().float(), [g.detach().float() for g in grads]


def check_attention(ctx: Context) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is fp32, not TF32
    torch.backends.cudnn.allow_tf32 = False
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    for shape in attention_shapes(ctx):
        label = f"{shape['recipe']} {shape['part']} {shape['seqs']}x{shape['tokens']} tok d{shape['dim']}/h{shape['heads']}"
        state: Dict[str, Any] = {}

        def reference() -> Dict[str, Any]:
            torch.manual_seed(0)
            state["layer"] = attention_layer(shape["dim"], shape["heads"], ctx.device)
            state["x"] = torch.randn(shape["seqs"], shape["tokens"], shape["dim"], device=ctx.device)
            state["g"] = torch.randn_like(state["x"])
            state["ref"] = attention_pass(state["layer"], state["x"], state["g"], "math", None)
            return {"backend": "math", "precision": "fp32", "shape": shape, "summary": "reference (fp32 math, no TF32)"}

        ctx.guarded(f"{label}: math fp32", reference)
        if "ref" not in state:
            continue
        for backend in ("math", "sdpa", "xformers"):
            if backend == "xformers" and not xformers_available():
                ctx.emit({"case": f"{label}: xformers", "status": "not installed", "backend": backend, "shape": shape,
                          "summary": "xformers does not import", "seconds": 0.0})
                continue
            if backend == "xformers" and ctx.device.type != "cuda":
                ctx.emit({"case": f"{label}: xformers", "status": "skipped", "backend": backend, "shape": shape,
                          "summary": "xFormers has no CPU kernels", "seconds": 0.0})
                continue
            if backend == "xformers" and xformers_problem(ctx.device):
                ctx.emit({"case": f"{label}: xformers", "status": "unusable", "backend": backend, "shape": shape,
                          "summary": xformers_problem(ctx.device), "seconds": 0.0})
                continue

            def compare(backend=backend) -> Dict[str, Any]:
                row: Dict[str, Any] = {"backend": backend, "shape": shape, "within_tol": True}
                parts = []
                for precision, dtype in dtypes.items():
                    if backend == "math" and dtype is None:
                        continue  # the reference itself
                    out, grads = attention_pass(state["layer"], state["x"], state["g"], backend, dtype)
                    ref_out, ref_grads = state["ref"]
                    out_err = (out - ref_out).abs().max().item()
                    grad_errs = [(g - r).abs().max().item() for g, r in zip(grads, ref_grads)]
                    out_rel = out_err / max(ref_out.abs().max().item(), 1e-30)
                    grad_rel = max(e / max(r.abs().max().item(), 1e-30) for e, r in zip(grad_errs, ref_grads))
                    finite = all(math.isfinite(v) for v in (out_err, *grad_errs))
                    within = finite and max(out_rel, grad_rel) <= ATTN_RTOL[precision]
                    row[precision] = {"out_max_abs_err": out_err, "grad_max_abs_err": max(grad_errs),
                                      "grad_max_abs_err_x_qkv_proj": grad_errs, "out_rel": out_rel,
                                      "grad_rel": grad_rel, "rtol": ATTN_RTOL[precision], "within_tol": within}
                    row["within_tol"] = row["within_tol"] and within
                    parts.append(f"{precision} out {out_err:.1e} grad {max(grad_errs):.1e} (rel {max(out_rel, grad_rel):.1e}"
                                 f"{'' if within else ' OVER TOL'})")
                row["summary"] = " | ".join(parts)
                return row

            ctx.guarded(f"{label}: {backend}", compare)
        state.clear()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- check: parity

@contextlib.contextmanager
def no_host_sync(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """On CUDA a host sync inside raises (torch.cuda.set_sync_debug_mode("error")): the trainer reads the
    device at log steps only (issue 28, point 2), so its other steps run under this."""
    if device.type != "cuda" or not enabled:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def check_parity(ctx: Context) -> None:
    steps, batch = (3, 8) if ctx.smoke else (50, 64)
    model = () if ctx.smoke else ("model.name=vit_small_patch16",)
    common = ("engine.name=single", "optim.warmup_epochs=0", "train.activation_checkpointing=none",
              "train.compile=false")
    batches: List[Any] = []
    for name in PARITY_RECIPES:
        def run(name=name) -> Dict[str, Any]:
            base = ctx.recipe(name, *model)
            losses: Dict[str, List[float]] = {}
            for precision in ("fp32", "bf16"):
                cfg = ctx.recipe(name, *model, *ctx.synthetic(base, batch, batch * steps), *common,
                                 f"train.precision={precision}")
                if not batches:  # the same batches for both precisions and both objectives
                    spec = MODELS.build(cfg.model.name)
                    data = build_dataset(cfg.data, spec.img_size, spec.in_chans, train=True)
                    workers = 0 if ctx.smoke else min(8, max((os.cpu_count() or 2) // 2, 1))
                    order = LoaderSpec(batch_size=batch, seed=cfg.train.seed, num_workers=workers)
                    for images, _, _ in data.loader(order, 0, 0):
                        batches.append(images)
                        if len(batches) == steps:
                            break
                trainer = Trainer(cfg)
                out = []
                for images in batches:  # after the first, a step that does not log must not sync (no_host_sync)
                    with no_host_sync(ctx.device, enabled=trainer.step > 0 and not trainer.logs_at(trainer.step + 1)):
                        out.append(trainer.train_step(images)["loss"].detach().float())
                    trainer.step += 1
                losses[precision] = [float(v) for v in out]
                del trainer
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
            rel = [abs(b - f) / max(abs(f), 1e-12) for f, b in zip(losses["fp32"], losses["bf16"])]
            finite = all(math.isfinite(v) for v in losses["fp32"] + losses["bf16"])
            within = finite and max(rel) <= PARITY_RTOL
            return {"model": cfg.model.name, "batch": batch, "steps": steps, "losses": losses, "rel_diff": rel,
                    "max_rel_diff": max(rel), "first_step_rel_diff": rel[0], "rtol": PARITY_RTOL,
                    "within_tol": within, "status": "ok" if finite else "FAILED",
                    "summary": f"{cfg.model.name} b{batch}, {steps} steps: max rel {max(rel):.2e} (step 1 {rel[0]:.1e}), "
                               f"loss {losses['fp32'][0]:.4f}->{losses['fp32'][-1]:.4f} fp32, "
                               f"{losses['bf16'][-1]:.4f} bf16; tol {PARITY_RTOL:g}"
                               f"{'' if within else ' OVER TOL'}"}

        ctx.guarded(f"{name}: bf16 vs fp32", run)


# ----------------------------------------------------------------------------- checks through bench/train_step.py

def train_step_case(ctx: Context, name: str, cfg, batch: int, extra: Sequence[str], steps: int, warmup: int) -> Dict[str, Any]:
    """A case for bench/train_step.py's run_child, built on the recipe itself."""
    return {"recipe": str(REPO / "recipes" / f"{name}.yaml"), "model": cfg.model.name, "batch": batch,
            "mask_ratio": cfg.mask.ratio, "device": ctx.device.type, "precision": cfg.train.precision,
            "attn": cfg.model.attn_backend, "ac": cfg.train.activation_checkpointing, "compile": cfg.train.compile,
            "kind": cfg.objective.name, "adamw": cfg.optim.implementation, "steps": steps, "warmup": warmup,
            "threads": torch.get_num_threads(), "gemm_size": 256 if ctx.smoke else 0,
            "gemm_repeats": 2 if ctx.smoke else 5, "extra": [*ctx.smoke_model(name), *extra],
            "label": f"{name} ({cfg.model.name})"}


def run_case(ctx: Context, case: Dict[str, Any], cap_s: float) -> Dict[str, Any]:
    timeout = min(cap_s, ctx.left() - 2)
    if timeout < 5:
        raise TimeoutError("no time left in this check's budget")
    result = run_child(case, timeout)
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def check_flop_ratio(ctx: Context) -> None:
    steps, warmup = (2, 1) if ctx.smoke else (10, 3)
    for name in RATIO_RECIPES:
        def run(name=name) -> Dict[str, Any]:
            cfg = ctx.recipe(name)
            micro = micro_batch(cfg)
            case = train_step_case(ctx, name, cfg, micro, [], steps, warmup)  # one pass of `micro` per step
            r = run_case(ctx, case, 150)
            keep = ("model", "batch", "kind", "attn", "flops_per_step", "step_s_best", "step_s_median",
                    "img_per_s", "tokens_per_s", "flops_per_s_best", "matmul_flops_per_s", "ratio", "ratio_median",
                    "peak_mem_bytes", "step_s_all", "matmul_flops_per_s_all", "warmup_s")
            gemm = "bf16 4096^3" if ctx.device.type == "cuda" else "fp32 256^3"
            return {**{k: r[k] for k in keep}, "gemm": gemm, "precision": ctx.amp(cfg),
                    "summary": f"ratio {r['ratio']:.3f} (median {r['ratio_median']:.3f}); b{micro} {ctx.amp(cfg)}, "
                               f"{r['img_per_s']:.0f} img/s, {flops(r['flops_per_s_best'])} of {flops(r['matmul_flops_per_s'])} "
                               f"({gemm} GEMM), peak {fmt_bytes(r['peak_mem_bytes'])}"}

        ctx.guarded(f"{name}: train-step FLOP/s / GEMM", run)


def check_memory(ctx: Context) -> None:
    for name in MEMORY_RECIPES:
        def run(name=name) -> Dict[str, Any]:
            cfg = ctx.recipe(name)
            micro = micro_batch(cfg)
            # Two micro-batches per step: gradient caching (OCL) or accumulation (MAE) runs as in the recipe.
            case = train_step_case(ctx, name, cfg, 2 * micro,
                                   [f"train.global_batch={2 * micro}", f"train.micro_batch={micro}"], 2, 1)
            r = run_case(ctx, case, 180)
            row = {"model": cfg.model.name, "micro_batch": micro, "images_per_step": 2 * micro,
                   "precision": ctx.amp(cfg), "activation_checkpointing": cfg.train.activation_checkpointing,
                   "compile": cfg.train.compile, "peak_mem_bytes": r["peak_mem_bytes"],
                   "step_mem_bytes": r["step_mem_bytes"], "mem_before_bytes": r["mem_before_bytes"],
                   "mem_kind": r["mem_kind"], "peak_mem_gib": r["peak_mem_bytes"] / GIB}
            note = ""
            if cfg.objective.name == "ocl":  # bench/train_step.py --estimate's formula, at this micro-batch
                spec = MODELS.build(cfg.model.name)
                _, tokens = ocl_tokens_per_image(spec, cfg.mask.ratio)
                estimate = step_memory(param_count(spec), [encoder_stack(spec, tokens)], bf16=ctx.amp(cfg) == "bf16",
                                       checkpointed=cfg.train.activation_checkpointing == "full").at(micro)
                row["estimate_bytes"] = estimate
                note = f", estimate {fmt_bytes(estimate)}"
            row["summary"] = (f"peak {fmt_bytes(r['peak_mem_bytes'])} ({r['mem_kind']}), step {fmt_bytes(r['step_mem_bytes'])}"
                              f"{note}; micro {micro} x2, {ctx.amp(cfg)}, "
                              f"AC {cfg.train.activation_checkpointing}")
            return row

        ctx.guarded(f"{name}: peak memory", run)


# ----------------------------------------------------------------------------- --tune: measure the candidates, choose

@dataclass(frozen=True)
class TuneVariant:
    """One factor changed from a recipe's own settings, as bench/train_step.py's case keys."""
    factor: str
    setting: str
    override: str  # the config override that selects it; an SDPA kernel has none (restrict_sdpa in the case)
    case: Dict[str, Any] = field(default_factory=dict)


RECIPE_SETTINGS = TuneVariant("recipe", "as the recipe", "")


def auto_largest(ctx: Context, cfg) -> Dict[str, Any]:
    """train.micro_batch: auto's largest micro-batch for the recipe on this device (scale/engine/memory_plan.py
    on the GPU's free memory now). A CPU has no device memory to size against: in smoke mode the free memory
    is a stand-in that holds 4 micro-batches, so the same estimate and search run."""
    module = build_pretrain_module(cfg)
    memory = pretrain_step_memory(module, cfg.mask.ratio, ctx.amp(cfg) == "bf16",
                                  cfg.train.activation_checkpointing.strip() == "full")
    del module
    if ctx.device.type == "cuda":
        free = torch.cuda.mem_get_info(ctx.device)[0]
    else:
        free = (memory.at(4 * micro_batch(cfg)) + memory.bytes_per_image / 2) / MARGIN
    largest = largest_micro_batch(memory, free)
    return {"largest": largest, "free_bytes": free, "estimate_bytes": memory.at(largest),
            "state_bytes": memory.state_bytes, "bytes_per_image": memory.bytes_per_image,
            "summary": f"auto's largest micro-batch {largest}: estimate {fmt_bytes(memory.at(largest))} "
                       f"({fmt_bytes(memory.state_bytes)} state + {memory.bytes_per_image / 2 ** 20:.1f} MiB/image) "
                       f"in {MARGIN:.0%} of {fmt_bytes(free)} free" + (" (a stand-in: no device memory)" if ctx.smoke else "")}


def tune_variants(ctx: Context, cfg, largest: int) -> List[Tuple[TuneVariant, str]]:
    """(variant, why it is skipped or ""), in the order they run: compile, micro-batch sizes up to auto's
    largest, SDPA kernels and xFormers, AdamW's kernel, activation checkpointing."""
    micro = micro_batch(cfg)
    cuda = ctx.device.type == "cuda"
    out = [(TuneVariant("compile", "on", "train.compile=true", {"compile": True, "warmup": 3}), "")]
    for n in sorted({min(2 * micro, largest), largest} - {micro}):
        out.append((TuneVariant("micro-batch", str(n), f"train.micro_batch={n}", {"batch": n}), ""))
    for kernel in SDPA_KERNELS:
        why = "" if cuda or kernel == "flash" else f"SDPA's {kernel} kernel has no CPU implementation"
        out.append((TuneVariant("attention", f"sdpa {kernel}", f"model.attn_backend=sdpa (SDPA kernel {kernel})",
                                {"attn": "sdpa", "sdpa_kernel": kernel}), why))
    why = ("xFormers has no CPU kernels" if not cuda else "xformers does not import" if not xformers_available()
           else xformers_problem(ctx.device) or "")
    out.append((TuneVariant("attention", "xformers", "model.attn_backend=xformers", {"attn": "xformers"}), why))
    for impl in ("fused", "foreach"):
        same = cuda and impl == "fused" and cfg.optim.implementation in ("auto", "fused")
        out.append((TuneVariant("AdamW", impl, f"optim.implementation={impl}", {"adamw": impl}),
                    "the recipe's own AdamW kernel on CUDA" if same else ""))
    out.append((TuneVariant("activation checkpointing", "full", "train.activation_checkpointing=full",
                            {"ac": "full"}), ""))
    return out


def tune_row(ctx: Context, name: str, cfg, variant: TuneVariant, recipe_ratio: Optional[float]) -> Dict[str, Any]:
    """The recipe with `variant` through bench/train_step.py's child (its own process and time limit)."""
    steps, warmup = (2, 1) if ctx.smoke else (6, 2)
    case = train_step_case(ctx, name, cfg, micro_batch(cfg), [], steps, warmup)
    case.update(variant.case, label=f"{name}: {variant.factor} {variant.setting}")
    # Compiling takes minutes on a shared CPU; on a GPU it is the first warm-up steps' tens of seconds.
    r = run_case(ctx, case, (300 if case["compile"] else 120) if ctx.smoke else (150 if case["compile"] else 90))
    vs = r["ratio"] / recipe_ratio if recipe_ratio else None
    return {"recipe": name, "model": cfg.model.name, "factor": variant.factor, "setting": variant.setting,
            "override": variant.override, "precision": ctx.amp(cfg), "batch": r["batch"], "ratio": r["ratio"],
            "ratio_median": r["ratio_median"], "vs_recipe": vs, "img_per_s": r["img_per_s"],
            "flops_per_s_best": r["flops_per_s_best"], "matmul_flops_per_s": r["matmul_flops_per_s"],
            "step_s_median": r["step_s_median"], "warmup_s": r["warmup_s"], "peak_mem_bytes": r["peak_mem_bytes"],
            "summary": f"ratio {r['ratio']:.3f}" + (f" ({vs:.2f}x the recipe's)" if vs else "")
                       + f", b{r['batch']} {ctx.amp(cfg)}, {r['img_per_s']:.0f} img/s, peak {fmt_bytes(r['peak_mem_bytes'])}"}


def check_tune(ctx: Context) -> None:
    """Each recipe as it is, then one factor at a time (every recipe before the next factor, so a budget
    that runs out costs the last factors); in smoke mode the factors on the first recipe only."""
    recipes = {name: ctx.recipe(name) for name in RATIO_RECIPES}
    ratios: Dict[str, Optional[float]] = {}
    largest: Dict[str, int] = {}
    for name, cfg in recipes.items():
        ctx.guarded(f"{name}: as the recipe", lambda name=name, cfg=cfg: tune_row(ctx, name, cfg, RECIPE_SETTINGS, None))
        last = ctx.result["rows"][-1]
        ratios[name] = last.get("ratio") if last.get("status") == "ok" else None

        def auto(name=name, cfg=cfg) -> Dict[str, Any]:
            chosen = auto_largest(ctx, cfg)
            largest[name] = chosen["largest"]
            return {"recipe": name, "factor": "auto micro-batch", **chosen}

        ctx.guarded(f"{name}: train.micro_batch=auto", auto)
    tuned = list(recipes)[:1] if ctx.smoke else list(recipes)
    plans = {name: tune_variants(ctx, recipes[name], largest.get(name, micro_batch(recipes[name]))) for name in tuned}
    for i in range(max(len(p) for p in plans.values())):
        for name in tuned:
            if i >= len(plans[name]):
                continue
            variant, skip = plans[name][i]
            label = f"{name}: {variant.factor} {variant.setting}"
            if skip:
                ctx.emit({"case": label, "status": "skipped", "recipe": name, "factor": variant.factor,
                          "setting": variant.setting, "override": variant.override, "summary": skip, "seconds": 0.0})
                continue

            def measure(name=name, variant=variant) -> Dict[str, Any]:
                try:
                    return tune_row(ctx, name, recipes[name], variant, ratios[name])
                except (RuntimeError, TimeoutError) as err:  # a setting that cannot run here is a result, not a bug
                    return {"status": "unusable", "recipe": name, "factor": variant.factor,
                            "setting": variant.setting, "override": variant.override, "summary": one_line(err)}

            ctx.guarded(label, measure)


def tune_table(rows: Sequence[Dict[str, Any]]) -> Tuple[List[str], Dict[str, List[str]]]:
    """The table of every measured case, and per recipe the overrides that beat its own settings' ratio by
    more than TUNE_MARGIN (each factor measured alone: their combination is not)."""
    lines = ["| recipe | factor | setting | train-step FLOP/s / GEMM | vs recipe | img/s | batch | peak mem | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    winners: Dict[str, List[str]] = {}
    measured = [r for r in rows if "setting" in r]
    for r in measured:
        ok = r.get("status") == "ok"
        lines.append(f"| {r['recipe']} | {r['factor']} | {r['setting']} | "
                     + (f"{r['ratio']:.3f} | {r['vs_recipe'] or 1.0:.2f}x | {r['img_per_s']:.0f} | {r['batch']} | "
                        f"{fmt_bytes(r['peak_mem_bytes'])} | ok |" if ok else
                        f" | | | | | {r.get('status')}: {r.get('reason') or r.get('summary', '')} |"))
    for name in dict.fromkeys(r["recipe"] for r in measured):
        best: Dict[str, Dict[str, Any]] = {}
        for r in measured:
            if r["recipe"] == name and r.get("status") == "ok" and r["factor"] != "recipe" and (
                    r["factor"] not in best or r["ratio"] > best[r["factor"]]["ratio"]):
                best[r["factor"]] = r
        winners[name] = [r["override"] for r in best.values() if (r["vs_recipe"] or 0) > 1 + TUNE_MARGIN]
    return lines, winners


# ----------------------------------------------------------------------------- --profile: where a step's time goes

# Events that make the host wait for the device: a tensor read back (.item(), .tolist(), a data-dependent
# shape: aten::_local_scalar_dense, which on CUDA waits in a cudaStreamSynchronize) and explicit stream/event
# waits. Counted per step: on CUDA the runtime's waits (so one .item() counts once), on a CPU the read-backs.
# The profile's own closing torch.cuda.synchronize (a cudaDeviceSynchronize) is not counted.
HOST_SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaEventSynchronize")
HOST_WAITS = {"cuda": ("cudaStreamSynchronize", "cudaEventSynchronize"), "cpu": ("aten::_local_scalar_dense",)}
PROFILE_TOP = 15


def profile_recipe(ctx: Context, name: str) -> Dict[str, Any]:
    """Steps of `name` at its micro-batch (steps that do not log) under torch.profiler: the top kernels by
    device time (on a CPU: the top operators by their own CPU time) and the host syncs per step."""
    steps, warmup = (2, 1) if ctx.smoke else (3, 3)
    base = ctx.recipe(name)
    micro = micro_batch(base)
    cfg = ctx.recipe(name, *ctx.synthetic(base, micro, micro), "engine.name=single", "optim.warmup_epochs=0",
                     f"train.log_every={10 ** 6}")
    trainer = Trainer(cfg)
    spec = trainer.spec
    images = torch.randn(micro, spec.in_chans, spec.img_size, spec.img_size, device=trainer.device)
    for _ in range(warmup):
        trainer.train_step(images)
        trainer.step += 1
    sync(ctx.device)
    cuda = ctx.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step(images)
            trainer.step += 1
        sync(ctx.device)
    events = prof.key_averages()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    timed = [e for e in events if e.device_type == kind and (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    total_us = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in timed) or 1.0
    top = sorted(timed, key=lambda e: e.self_device_time_total if cuda else e.self_cpu_time_total, reverse=True)
    kernels = [{"name": e.key[:160], "ms_per_step": (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps,
                "share": (e.self_device_time_total if cuda else e.self_cpu_time_total) / total_us,
                "calls_per_step": e.count / steps} for e in top[:PROFILE_TOP]]
    syncs = {e.key: e.count / steps for e in events if e.key in HOST_SYNC_EVENTS}
    if ctx.report:  # the profiler's own table beside the JSON, for reading
        table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=40)
        Path(ctx.report).with_name(f"{Path(ctx.report).stem}_profile_{name}.txt").write_text(table)
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    per_step = sum(syncs.get(key, 0.0) for key in HOST_WAITS[ctx.device.type])
    return {"recipe": name, "model": cfg.model.name, "batch": micro, "precision": ctx.amp(cfg), "steps": steps,
            "top_kernels": kernels, "host_syncs_per_step": per_step, "host_sync_events_per_step": syncs,
            "kernel_ms_per_step": total_us / 1e3 / steps,
            "summary": f"b{micro} {ctx.amp(cfg)}: {total_us / 1e3 / steps:.1f} ms of "
                       f"{'kernels' if cuda else 'CPU operators'} per step, host syncs per step {per_step:g}; top: "
                       + ", ".join(f"{k['name'][:40]} {k['share']:.0%}" for k in kernels[:3])}


def check_profile(ctx: Context) -> None:
    for name in RATIO_RECIPES:
        ctx.guarded(f"{name}: profile", lambda name=name: profile_recipe(ctx, name))


# ----------------------------------------------------------------------------- check: fsdp

def check_fsdp(ctx: Context) -> None:
    batch = 8 if ctx.smoke else 32
    model = () if ctx.smoke else ("model.name=vit_small_patch16",)
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    base = ctx.recipe("ocl_vitb16", *model)
    engines: List[Any] = []  # closed at the end: the first made the process group, the others joined it

    def fit(out: str, max_steps: int, *extra: str):
        cfg = ctx.recipe("ocl_vitb16", *model, *ctx.synthetic(base, batch, batch * 8), "engine.name=fsdp",
                         f"engine.backend={backend}", "optim.warmup_epochs=0", f"train.max_steps={max_steps}",
                         "train.log_every=1", "train.ckpt_every=2", f"train.output_dir={ctx.tmp / out}", *extra)
        trainer = Trainer(cfg)
        engines.append(trainer.engine)
        return trainer, trainer.fit()

    def run() -> Dict[str, Any]:
        t1, first = fit("run", 3)
        world, engine = t1.engine.world_size, t1.engine.name
        del t1
        ckpt = Path(first.last_checkpoint or "")
        saved = ckpt.is_dir() and any(ckpt.rglob("*"))
        t2, resumed = fit("run", 5, "train.resume=auto")
        del t2
        t3, straight = fit("straight", 5)
        del t3
        tail = straight.losses[3:]
        rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(resumed.losses, tail)]
        finite = all(math.isfinite(v) for v in first.losses + resumed.losses + straight.losses)
        resumed_ok = resumed.steps_done == 2 and resumed.final_step == 5
        problems = [text for ok, text in ((finite, "a loss is not finite"), (saved, f"no checkpoint at {ckpt}"),
                                          (resumed_ok, f"resume ran {resumed.steps_done} steps to "
                                                       f"{resumed.final_step}, not 2 to 5"),
                                          (world == 1 and engine == "fsdp", f"engine {engine} x{world}")) if not ok]
        return {"status": "FAILED" if problems else "ok", "reason": "; ".join(problems), "backend": backend,
                "world_size": world, "losses_first": first.losses, "losses_resumed": resumed.losses,
                "losses_uninterrupted": straight.losses, "checkpoint": str(ckpt), "checkpoint_saved": saved,
                "resumed": resumed_ok, "resume_max_rel_diff": max(rel) if rel else None,
                "summary": f"{backend} x{world}: 3 steps, ckpt {ckpt.name or '-'} {'saved' if saved else 'MISSING'}, "
                           f"resumed to step {resumed.final_step}; losses {first.losses[0]:.4f}..{resumed.losses[-1]:.4f} "
                           f"finite={finite}; resumed vs uninterrupted max rel {max(rel) if rel else float('nan'):.1e}"}

    try:
        ctx.guarded(f"FSDP2 1 GPU ({base.model.name}, ckpt + resume)" if not ctx.smoke else
                    f"FSDP2 1 process, gloo ({base.model.name}, ckpt + resume)", run)
    finally:
        for engine in engines:
            engine.close()


# ----------------------------------------------------------------------------- check: ehm

def check_ehm(ctx: Context) -> None:
    case = EHM_SMOKE if ctx.smoke else EHM_CASE

    def run() -> Dict[str, Any]:
        if ctx.left() < 5:
            raise TimeoutError("no time left in this check's budget")
        from bench.ehm_cost import PAPER, measure  # here: a broken import fails this check's row, not the script
        r = measure(case["preset"], case["batch"], case["steps"], ctx.device.type, warmup=case["warmup"])
        ratios = ("signal_per_step", "tree_per_step", "mask_per_step", "ehm_step_per_random_step",
                  "signal_flops_per_random_step_flops", "greedy_per_rnn_tree")
        problems = [f"{k} is {r[k]}" for k in ratios if not (math.isfinite(r[k]) and r[k] > 0)]
        if not math.isfinite(r["ehm_rest_per_random_step"]):  # a difference of medians: ~1, finite is all it must be
            problems.append(f"ehm_rest_per_random_step is {r['ehm_rest_per_random_step']}")
        if not r["trees_identical"]:
            problems.append("rnn and greedy trees differ")
        return {**r, "paper": PAPER, "status": "FAILED" if problems else "ok", "reason": "; ".join(problems),
                "summary": f"signal/step {r['signal_per_step']:.1%} (paper {PAPER['signal_share']:.1%}), "
                           f"tree/step {r['tree_per_step']:.1%} ({PAPER['tree_share']:.1%}), "
                           f"EHM/random step {r['ehm_step_per_random_step']:.2f}x (rest {r['ehm_rest_per_random_step']:.2f}), "
                           f"signal FLOPs {r['signal_flops_per_random_step_flops']:.1%}; tree greedy/rnn "
                           f"{r['greedy_per_rnn_tree']:.1f}x, rounds {r['rounds']['rnn']}/{r['rounds']['greedy']}, "
                           f"identical {'yes' if r['trees_identical'] else 'NO'}; {r['precision']}"}

    ctx.guarded(f"MAE {case['preset']} b{case['batch']}: EHM vs random step", run)


# ----------------------------------------------------------------------------- check: decode

def check_decode(ctx: Context) -> None:
    """data.decode=gpu: (1) a batch of full-size JPEGs decoded, cropped and flipped on the device vs the CPU
    path's images, and per-image time of each; (2) with webdataset installed, bench/loader_throughput.py's
    paths through one DataLoader worker, and the cores per GPU from this run's flop_ratio rows."""
    import numpy as np

    from scale.data.gpu_decode import DeviceJpegItems, gpu_decode_problem
    from scale.data.transforms import PretrainTransform, open_image

    count = 16 if ctx.smoke else 256

    def batch_decode() -> Dict[str, Any]:
        if ctx.device.type == "cuda" and gpu_decode_problem(ctx.device) is not None:
            raise RuntimeError(gpu_decode_problem(ctx.device))
        rng = np.random.default_rng(0)
        jpegs = []
        for _ in range(16):
            buf = io.BytesIO()
            smooth_noise_image(rng, *JPEG_SIZES["full_size"]).save(buf, "JPEG", quality=90)
            jpegs.append(buf.getvalue())
        samples = [jpegs[i % len(jpegs)] for i in range(count)]
        transform = PretrainTransform(224, 3)
        items = DeviceJpegItems(transform)
        torch.set_num_threads(1)  # a DataLoader worker's view
        t = time.perf_counter()
        cpu = torch.stack([transform(open_image(io.BytesIO(s)), seed) for seed, s in enumerate(samples)])
        cpu_ms = 1e3 * (time.perf_counter() - t) / count
        t = time.perf_counter()
        batch = items.collate([items(s, seed) for seed, s in enumerate(samples)])
        header_ms = 1e3 * (time.perf_counter() - t) / count
        best = float("inf")
        for _ in range(3):
            sync(ctx.device)
            t = time.perf_counter()
            device, _ = batch.decode(ctx.device)
            sync(ctx.device)
            best = min(best, time.perf_counter() - t)
        levels = (device.float().cpu() - cpu.float()).abs()
        mean = levels.mean().item()
        return {"images": count, "cpu_path_ms_per_image": cpu_ms, "worker_ms_per_image_gpu_path": header_ms,
                "device_decode_ms_per_image": 1e3 * best / count, "pixel_mean_abs_levels": mean,
                "pixel_max_abs_levels": levels.max().item(),
                "status": "FAILED" if mean > 3 else "ok", "reason": "" if mean <= 3 else
                f"device and CPU pixels differ by {mean:.2f} levels of 255 on average (> 3)",
                "summary": f"per image: CPU path {cpu_ms:.2f} ms on 1 core; device path: worker {header_ms:.3f} ms "
                           f"(header + crop), decode {1e3 * best / count:.3f} ms on {ctx.device.type}; |device - "
                           f"cpu| {mean:.2f} levels mean, {levels.max().item():.0f} max"}

    ctx.guarded(f"{count} JPEGs 500x375 -> 224: device decode vs CPU path", batch_decode)

    def loader_paths() -> Dict[str, Any]:
        status = webdataset_status()
        if status.startswith("absent"):
            return {"status": "skipped", "reason": f"webdataset {status}", "summary": "install .whl/webdataset*.whl"}
        from bench import loader_throughput as lt  # here: it imports webdataset

        root = ctx.tmp / "full_size"
        lt.write_shards(root, 128 if ctx.smoke else 1024, JPEG_SIZES["full_size"], 64, 0)
        paths = ("previous", "cpu", "gpu")
        timed = {p: max((lt.time_path(p, root, 1, 64, ctx.device) for _ in range(1 if ctx.smoke else 2)),
                        key=lambda r: r["img_per_s"]) for p in paths}
        spec = LoaderSpec(batch_size=64, seed=0)
        cpu_data, gpu_data = lt.scale_loader(root, "cpu"), lt.scale_loader(root, "gpu")
        (a, _, _), (b, _, _) = next(iter(cpu_data.loader(spec, 0))), next(iter(gpu_data.loader(spec, 0)))
        levels = (gpu_data.device_input.pixels(b, ctx.device).float().cpu() - a.float()).abs().mean().item()
        speed = {p: r["img_per_s_per_core"] for p, r in timed.items()}
        rows = lt.gpu_images_per_s(Path(ctx.report), measured_here=True) if ctx.report else []
        table = lt.cores_per_gpu_table(rows, {"full_size": speed}) if rows else []
        return {"img_per_s_per_core": speed, "pixel_mean_abs_levels": levels, "cores_per_gpu": rows, "table": table,
                "status": "FAILED" if levels > 3 else "ok", "reason": "" if levels <= 3 else "pixels differ",
                "summary": f"img/s per worker core: previous {speed['previous']:.0f}, cpu {speed['cpu']:.0f}, device "
                           f"decode {speed['gpu']:.0f}; |gpu - cpu| {levels:.2f} levels; cores/GPU (cpu -> gpu): " +
                           ", ".join(f"{r['method']} {r['model']} {r['cores_per_gpu']['full_size']['cpu']:.1f} -> "
                                     f"{r['cores_per_gpu']['full_size']['gpu']:.1f}" for r in rows)}

    ctx.guarded("loader paths: previous / cpu / gpu decode, one worker", loader_paths)


CHECK_FUNCTIONS: Dict[str, Callable[[Context], None]] = {
    "attention": check_attention, "parity": check_parity, "flop_ratio": check_flop_ratio, "fsdp": check_fsdp,
    "memory": check_memory, "ehm": check_ehm, "decode": check_decode, "tune": check_tune, "profile": check_profile,
}


def child_main(args: argparse.Namespace) -> int:
    ctx = Context(args.device, args.smoke, args._deadline, Path(args._result))
    ctx.report = args._report or ""
    write_json(ctx.result_path, ctx.result)
    try:
        CHECK_FUNCTIONS[args._check](ctx)
    finally:
        shutil.rmtree(ctx.tmp, ignore_errors=True)  # FSDP2 checkpoints, run folders
    ctx.result["done"] = True
    write_json(ctx.result_path, ctx.result)
    return 0


# ----------------------------------------------------------------------------- parent: run, print, write

COLUMNS = (("check", 10), ("case", 58), ("status", 13))


def table_line(check: str, case: str, status: str, result: str) -> str:
    cells = [check, case, status]
    return "  ".join(c[:w].ljust(w) for c, (_, w) in zip(cells, COLUMNS)) + "  " + result


def row_line(check: str, row: Dict[str, Any]) -> str:
    status = row.get("status", "ok")
    result = row.get("summary", "")
    if status == "FAILED":
        result = f"{row.get('reason', '')}" + (f" | {result}" if result else "")
    return table_line(check, row.get("case", ""), status, result)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_check(name: str, args: argparse.Namespace, timeout: float, log, report: Dict[str, Any],
              save: Callable[[], None]) -> None:
    """The check in a child process (its own process group, killed whole on timeout); rows are printed
    and saved as the child writes them."""
    entry = report["checks"][name]
    entry.update({"status": "running", "timeout_s": round(timeout, 1)})
    save()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.gpu_check", "--_check", name, "--_result", str(result_path),
               "--_deadline", str(started + timeout - 3), "--device", args.device, "--_report", args._report] + \
            (["--smoke"] if args.smoke else [])
        log.write(f"\n===== {name} (limit {timeout:.0f} s) =====\n")
        log.flush()
        # Its own process group (not a new session), so a timeout kills it with its bench/train_step.py children.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), **group)
        shown, timed_out = 0, False
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    finished = True
                except subprocess.TimeoutExpired:
                    finished = False
                rows = read_rows(result_path)
                for row in rows[shown:]:
                    print(row_line(name, row), flush=True)
                if len(rows) > shown:
                    shown = len(rows)
                    entry["rows"] = rows
                    save()
                if finished:
                    break
                if time.time() - started > timeout:
                    timed_out = True
                    kill_group(proc)
                    break
        except BaseException:
            kill_group(proc)
            raise
        rows = read_rows(result_path)
        for row in rows[shown:]:
            print(row_line(name, row), flush=True)
        done = bool(read_result(result_path).get("done"))
    entry["rows"] = rows
    entry["seconds"] = round(time.time() - started, 1)
    failed = [r for r in rows if r.get("status") == "FAILED"]
    if timed_out:
        entry.update(status="FAILED", reason=f"timed out after {timeout:.0f} s ({len(rows)} rows done)")
    elif proc.returncode != 0 or not done:
        entry.update(status="FAILED", reason=f"child exited {proc.returncode}: {last_error_line(log.name, name)}")
    elif failed:
        entry.update(status="FAILED", reason=f"{len(failed)} of {len(rows)} cases failed: {failed[0].get('reason', '')}")
    else:
        entry.update(status="ok", reason="")
    over = [r["case"] for r in rows if r.get("within_tol") is False]
    entry["over_tolerance"] = over
    status = entry["status"] + (f", {len(over)} over tolerance" if over else "")
    print(table_line(name, "== check", status, f"{entry['seconds']:.1f} s" + (f": {entry['reason']}" if entry["reason"] else "")),
          flush=True)
    save()


def read_result(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_rows(path: Path) -> List[Dict[str, Any]]:
    return list(read_result(path).get("rows", []))


def last_error_line(log_path: str, name: str) -> str:
    """The last non-empty line the child printed in its section of the log."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return "no log"
    section = text.rsplit(f"===== {name} ", 1)[-1].splitlines()[1:]
    lines = [line.strip() for line in section if line.strip()]
    return lines[-1][:240] if lines else "no output"


def default_json() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else Path.cwd() / "gpu_check.json"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes (with --device cpu: prove the code paths)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for all checks together (default: their shares, 540; --tune/--profile 480)")
    p.add_argument("--json", type=Path, default=None, help="default: $OUT/gpu_check.json, else ./gpu_check.json")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS + MODES)}")
    p.add_argument("--tune", action="store_true", help="instead of the checks: OCL ViT-B/L and MAE ViT-B each as the "
                   "recipe and with one factor changed (compile, micro-batch up to auto's, SDPA kernels / xFormers, "
                   "AdamW kernel, activation checkpointing); the ratio table and the overrides that win")
    p.add_argument("--profile", action="store_true", help="per recipe: the top 15 kernels by device time and the "
                   "host syncs per step (with --tune: after it)")
    p.add_argument("--_check", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    p.add_argument("--_deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--_report", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args._check:
        return child_main(args)
    modes = [m for m in MODES if getattr(args, m)]
    only = modes or [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in only if c not in CHECKS + MODES]
    if unknown:
        print(f"gpu_check: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS + MODES)}",
              file=sys.stderr)
        return 2
    if args.budget_s is None:
        args.budget_s = TUNE_BUDGET_S if modes else float(sum(SHARES[c] for c in only))
    if args.device == "cpu":  # for the children, which compute: docs/throughput.md, on a shared CPU
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads made steps ~100x slower
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is present (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "run it on a GPU machine, or pass --device cpu --smoke to exercise the code paths", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.smoke:
        print("gpu_check: --device cpu needs --smoke (the real shapes would take hours on a CPU)", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still takes the running check's group down
    started = time.time()
    json_path = (args.json or default_json()).resolve()
    args._report = str(json_path)
    log_path = json_path.with_suffix(".log")
    env = environment(args.device)
    env["webdataset"] = webdataset_status()
    report: Dict[str, Any] = {
        "env": env, "args": {"device": args.device, "smoke": args.smoke, "budget_s": args.budget_s, "only": only},
        "tolerances": {"attention_rel": ATTN_RTOL, "parity_rel": PARITY_RTOL},
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "complete": False,
        "checks": {name: {"status": "pending" if name in only else "not run", "reason": "", "seconds": 0.0, "rows": []}
                   for name in CHECKS + tuple(m for m in MODES if m in only)},
    }

    def save() -> None:
        write_json(json_path, report)

    print(f"# gpu_check {'SMOKE ' if args.smoke else ''}on {args.device}: torch {env['torch']} (CUDA build "
          f"{env['cuda_build']}), GPU {env.get('gpu') or 'none'}"
          + (f" {env.get('gpu_capability')} {env.get('gpu_memory_gib')} GiB x{env.get('gpu_count')}, "
             f"cuDNN {env.get('cudnn')}, NCCL {env.get('nccl')}" if env.get("gpu") else ""), flush=True)
    print(f"# xformers {env['xformers']} | timm {env['timm']} | webdataset {env['webdataset']} | python {env['python']} "
          f"| {env['cpus']} CPUs | commit {env['git_commit']}", flush=True)
    print(f"# budget {args.budget_s:.0f} s | JSON {json_path} | logs {log_path} | tolerances: attention rel "
          f"fp32 {ATTN_RTOL['fp32']:g} bf16 {ATTN_RTOL['bf16']:g}, parity rel {PARITY_RTOL:g}", flush=True)
    print(table_line(*(n for n, _ in COLUMNS), "result"), flush=True)
    print(table_line(*("-" * w for _, w in COLUMNS), "-" * 40), flush=True)
    save()

    scale_budget = args.budget_s / sum(SHARES[c] for c in only)
    deadline = started + args.budget_s
    with open(log_path, "w") as log:
        for i, name in enumerate(only):
            left = deadline - time.time()
            later = sum(SHARES[c] for c in only[i + 1:]) * scale_budget  # kept for the checks still to run
            timeout = max(left - later, min(SHARES[name] * scale_budget, left))
            if timeout < 5:
                report["checks"][name].update(status="FAILED", reason="skipped: the budget ran out")
                print(table_line(name, "== check", "FAILED", "skipped: the budget ran out"), flush=True)
                save()
                continue
            try:
                run_check(name, args, timeout, log, report, save)
            except Exception as err:  # noqa: BLE001 (the parent reports and goes on)
                report["checks"][name].update(status="FAILED", reason=f"gpu_check itself: {one_line(err)}")
                print(table_line(name, "== check", "FAILED", report["checks"][name]["reason"]), flush=True)
                save()
    if "tune" in only:
        lines, winners = tune_table(report["checks"]["tune"]["rows"])
        report["tune"] = {"table": lines, "winners": winners, "margin": TUNE_MARGIN}
        print("\n# --tune: train-step FLOP/s over the FLOP/s of a " + ("bf16 4096^3" if args.device == "cuda" else
              "fp32 256^3") + " GEMM measured in each case's process; one factor changed at a time", flush=True)
        print("\n".join(lines), flush=True)
        for name, overrides in winners.items():
            print(f"# overrides that win for {name} (> {TUNE_MARGIN:.0%} over the recipe's ratio, each alone): "
                  f"{' '.join(overrides) or 'none: keep the recipe'}", flush=True)
    report["complete"] = True
    report["seconds"] = round(time.time() - started, 1)
    ran = [report["checks"][c] for c in only]
    failed = [c for c in only if report["checks"][c]["status"] != "ok"]
    over = [case for c in ran for case in c.get("over_tolerance", [])]
    report["ok"] = not failed and not over
    save()
    print(f"# {len(only)} checks in {report['seconds']:.0f} s: {len(only) - len(failed)} ok"
          + (f", FAILED: {', '.join(failed)}" if failed else "")
          + (f", over tolerance: {len(over)} case(s)" if over else "") + f" | JSON {json_path}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
