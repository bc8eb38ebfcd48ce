"""Train-step throughput of OCL pre-training: img/s, visible tokens/s, achieved FLOP/s and its
ratio to a large matmul's FLOP/s measured in the same run on the same device, peak memory.

A step is the trainer's own `Trainer.train_step` (masks + forward + loss + backward + AdamW
step, through the `single` engine), on a fixed batch of random images (data loading is not
timed: see bench/loader_throughput.py). FLOPs are the run's plan (`scale.trainer.step_plan`: the exact
matmul count from the shapes, a mask generator's own forward such as EHM's signal included), as the
trainer logs them.
The reference is a square GEMM (fp32 2048^3 on CPU, bf16 4096^3 on CUDA), repeated, best-of,
measured in the same process before the model is built and after the timed steps.
ratio = FLOPs / best step time / best reference: both best-of, so that load from other processes
on a shared machine biases neither side (`ratio (median)` uses the median step). The FLOPs are
the model's (activation-checkpointing recomputation is not counted), so the ratio is a model-FLOP
utilisation relative to what this device's GEMM reaches. Each case runs in a
fresh child process, so compile caches, allocator state and peak memory do not leak between
cases; `--rounds N` repeats every case N times, interleaved, and pools the timings.

Peak memory. CUDA: torch.cuda.max_memory_allocated over warm-up + timed steps (tensors only,
no CUDA context / allocator slack); `step mem` is that minus what was allocated before the
first step. CPU: the child's peak resident set (/proc/self/status VmHWM, the kernel's high-water
mark of the child's own address space, read before the reference GEMM runs); `step mem` is that
minus the resident set just before the first step (activations, gradients, AdamW state, allocator
slack). No tracemalloc: it sees Python objects, not torch's allocations.

    python -m bench.train_step                       # the CPU recipe's model and batch
    python -m bench.train_step --compare --out bench_train_step.json
    python -m bench.train_step --methods --eager-and-compiled   # each case eager and compiled, side by side
    python -m bench.train_step --memory-sweep        # largest micro-batch per small preset (CPU)
    python -m bench.train_step --estimate            # activation-memory estimate, ViT-B/L/H on 80 GB
    python -m bench.train_step --device cuda --model vit_large_patch16 --batch 64 --precision bf16

The table's last line carries `ratio=<achieved / matmul>` of the first (baseline) case.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from bench.common import GIB, REPO, fmt_bytes, peak_rss_bytes, rss_bytes, sync
from scale.config import load_config
from scale.engine import plan_batch
from scale.engine.memory_plan import (STATE_BYTES_PER_PARAM, StepMemory, activation_bytes_per_image,
                                     largest_micro_batch, param_count)
from scale.masking.base import visible_count
from scale.models import MODELS, ViTSpec
from scale.models.attention import xformers_problem
from scale.trainer import Trainer, step_plan
from scale.trainer.flops import train_step_flops
from scale.trainer.optim import build_optimizer

DEFAULT_RECIPE = REPO / "recipes" / "ocl_cpu_tiny.yaml"
SMALL_PRESETS = ("vit_tiny_patch4_28", "vit_tiny_patch7_28", "vit_small_patch4_28", "vit_tiny_patch4_32")


# ----------------------------------------------------------------------------- helpers

def recipe_defaults(model: Optional[str]) -> Dict[str, Any]:
    """Micro-batch and mask ratio of the OCL recipe whose model.name is `model` (plain YAML: only
    these two values are taken from it; the run itself is built on the CPU recipe)."""
    if model:
        for path in sorted((REPO / "recipes").glob("*.yaml")):
            with open(path) as f:
                data = yaml.safe_load(f) or {}
            if (data.get("model") or {}).get("name") == model and (data.get("mask") or {}).get("ratio") is not None:
                train = data.get("train") or {}  # per-device micro-batch: the gradient-caching chunk if any
                return {"recipe": str(path), "batch": train.get("micro_batch") or train.get("batch_size"),
                        "mask_ratio": (data.get("mask") or {}).get("ratio")}
    return {}


def matmul_flops_per_s(device: torch.device, size: int, dtype: torch.dtype, repeats: int) -> float:
    """Best-of `repeats` FLOP/s of a (size x size) @ (size x size) GEMM."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 1  # CUDA: amortise launch + sync over a few GEMMs
    torch.mm(a, b, out=out)
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * size ** 3 / best


def full_token_flops(spec: ViTSpec, batch: int) -> int:
    """A plain ViT step over all 1 + N tokens, one sequence per image (the linear head is < 0.1%)."""
    return train_step_flops(spec, batch, 1, spec.num_patches)



# ----------------------------------------------------------------------------- activation memory
# The estimate itself is the library's (scale/engine/memory_plan.py, which train.micro_batch: auto uses).

def ocl_tokens_per_image(spec: ViTSpec, mask_ratio: float, groups: int = 2) -> Tuple[int, int]:
    """(visible patches per group, tokens per image incl. one CLS per group), as RandomGroupMasking."""
    per_group = visible_count(spec.num_patches, mask_ratio, groups) // groups
    return per_group, groups * (1 + per_group)


def gpu_estimates(memory_gib: float = 80.0, usable: float = 0.9) -> List[Dict[str, Any]]:
    """Largest micro-batch on one `memory_gib` GPU (bf16 autocast, fp32 AdamW master state),
    from the library's step-memory estimate (scale/engine/memory_plan.py): an ESTIMATE, not a measurement."""
    rows = []
    for name, ratio in (("vit_base_patch16", 0.3), ("vit_large_patch16", 0.4), ("vit_huge_patch16", 0.4)):
        spec = MODELS.build(name)
        params = param_count(spec)
        states = STATE_BYTES_PER_PARAM * params  # fp32 weights, grads, AdamW moments; autocast's bf16 copies
        n, ocl_tokens = ocl_tokens_per_image(spec, ratio)
        for kind, tokens in (("ocl", ocl_tokens), ("full-token", 1 + spec.num_patches)):
            for ac in (False, True):
                per_image = activation_bytes_per_image(spec, tokens, bf16=True, checkpointed=ac)
                rows.append({"model": name, "mask_ratio": ratio if kind == "ocl" else 0.0, "kind": kind,
                             "tokens_per_image": tokens, "activation_checkpointing": "full" if ac else "none",
                             "params_M": params / 1e6, "model_state_GiB": states / GIB,
                             "activation_MiB_per_image": per_image / 2 ** 20,
                             "max_batch_estimate": largest_micro_batch(StepMemory(states, per_image),
                                                                       memory_gib * GIB, usable)})
    return rows


# ----------------------------------------------------------------------------- one case (child)

class FullTokenClassifier(nn.Module):
    """The cost OCL saves: the same encoder over all 1 + N tokens, one sequence per image,
    with a linear head and cross-entropy (a supervised-style step)."""

    def __init__(self, encoder: nn.Module, num_classes: int = 1000):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, num_classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cls = self.encoder(images)[:, 0]  # group_ids None: all patches, one group
        return F.cross_entropy(self.head(cls).float(), labels)

    def no_weight_decay(self) -> set:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}


SDPA_KERNELS = ("flash", "efficient", "cudnn")


def restrict_sdpa(kernel: str) -> None:
    """Let scaled_dot_product_attention run only `kernel` in this process (a case's `sdpa_kernel`, set by
    bench/gpu_check.py --tune): shapes it cannot run fail the case instead of falling back to another kernel.
    No config key chooses SDPA's kernel; model.attn_backend=sdpa leaves it to torch."""
    if kernel not in SDPA_KERNELS:
        raise ValueError(f"sdpa_kernel must be one of {', '.join(SDPA_KERNELS)}, got {kernel!r}")
    torch.backends.cuda.enable_flash_sdp(kernel == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(kernel == "efficient")
    torch.backends.cuda.enable_cudnn_sdp(kernel == "cudnn")
    torch.backends.cuda.enable_math_sdp(False)


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    """Build the trainer for `case`, time its steps, measure memory and the reference GEMM."""
    torch.set_num_threads(case["threads"])
    if case.get("sdpa_kernel"):
        restrict_sdpa(case["sdpa_kernel"])
    device = torch.device(case["device"])
    gemm = (case["gemm_size"] or (4096 if device.type == "cuda" else 2048),
            torch.bfloat16 if device.type == "cuda" else torch.float32, case["gemm_repeats"])
    # Before the model exists (its 3 x 16 MiB stay below any step's peak RSS) and after the steps.
    references = [matmul_flops_per_s(device, *gemm)]
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"model.name={case['model']}", f"mask.ratio={case['mask_ratio']}", "train.global_batch=null",
            f"train.micro_batch={case['batch']}",
            f"train.device={case['device']}", f"train.precision={case['precision']}",
            f"model.attn_backend={case['attn']}", f"train.activation_checkpointing={case['ac']}",
            f"train.compile={str(case['compile']).lower()}", "engine.name=single",
            "data.name=synthetic", f"data.num_samples={case['batch']}", "data.num_workers=0",
            "train.epochs=1000000", "optim.warmup_epochs=0", f"train.output_dir={tmp}",
            f"optim.implementation={case['adamw']}", *case.get("extra", ()),
        ]
        spec = MODELS.build(case["model"])
        overrides += [f"data.mean={[0.5] * spec.in_chans}", f"data.std={[0.25] * spec.in_chans}"]
        cfg = load_config(case["recipe"], overrides)
        trainer = Trainer(cfg)
        spec = trainer.spec
        # The images of one step on this rank: the micro-batch, or with a global_batch above it (gpu_check's
        # memory check) all of them, which the step passes in micro-batches (its masks are drawn for all).
        batch = trainer.batch_plan.per_rank_batch
        images = torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size, device=trainer.device)
        if case["kind"] in ("ocl", "mae", "asl"):
            # The library's plan of this run: the encoder over the masks' groups (ASL's DLE: twice), the
            # objective's layers, and a mask generator's own forward (EHM's signal), as the trainer logs them.
            plan = step_plan(cfg)
            groups = plan.num_groups * trainer.pretrain_module.objective.needs.encoder_passes
            visible, flops, mask_flops = plan.visible_per_group, plan.flops, plan.mask_flops

            def step() -> None:
                trainer.train_step(images)
                trainer.step += 1
        else:
            groups, visible, mask_flops = 1, spec.num_patches, 0
            flops = full_token_flops(spec, batch)
            model = FullTokenClassifier(trainer.pretrain_module.encoder).to(trainer.device)
            optimizer = build_optimizer(model, cfg.optim, trainer.base_lr)
            labels = torch.randint(0, 1000, (batch,), device=trainer.device)

            def step() -> None:
                with torch.autocast(trainer.device.type, dtype=trainer.amp_dtype or torch.float32,
                                    enabled=trainer.amp_dtype is not None):
                    loss = model(images, labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            mem_before = torch.cuda.memory_allocated(device)
        else:
            mem_before = rss_bytes()
        started = time.perf_counter()
        for _ in range(case["warmup"]):
            step()
        sync(device)
        warmup_s = time.perf_counter() - started
        times = []
        for _ in range(case["steps"]):
            start = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
        trainer = images = step = None  # free the model and the batch before the reference GEMM
    references.append(matmul_flops_per_s(device, *gemm))
    raw = {**case, "groups": groups, "visible_per_group": visible, "tokens_per_step": batch * groups * (1 + visible),
           "flops_per_step": flops, "mask_signal_flops_per_step": mask_flops, "step_s_all": times,
           "warmup_s": warmup_s, "matmul_flops_per_s_all": references,
           "peak_mem_bytes": peak, "step_mem_bytes": peak - mem_before, "mem_before_bytes": mem_before,
           "mem_kind": "cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS (VmHWM)",
           "loadavg_end": [os.getloadavg()[0]]}
    return summarize(raw)


def summarize(r: Dict[str, Any]) -> Dict[str, Any]:
    """Derived metrics from the step times and reference GEMMs (best-of: least disturbed by other load)."""
    best, median = min(r["step_s_all"]), statistics.median(r["step_s_all"])
    reference = max(r["matmul_flops_per_s_all"])
    flops, tokens = r["flops_per_step"], r["tokens_per_step"]
    return {**r, "step_s_best": best, "step_s_median": median, "img_per_s": r["batch"] / median,
            "tokens_per_s": tokens / median, "flops_per_s_best": flops / best, "flops_per_s_median": flops / median,
            "matmul_flops_per_s": reference, "ratio": flops / best / reference,
            "ratio_median": flops / median / reference}


def merge_rounds(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One case measured in several interleaved rounds: pool the step times and the references."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    merged = dict(ok[0])
    for key in ("step_s_all", "matmul_flops_per_s_all", "loadavg_end"):
        merged[key] = [x for r in ok for x in r[key]]
    merged["peak_mem_bytes"] = max(r["peak_mem_bytes"] for r in ok)
    merged["step_mem_bytes"] = max(r["step_mem_bytes"] for r in ok)
    merged["rounds"] = len(ok)
    return summarize(merged)


def run_child(case: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """`case` in a fresh interpreter; returns its result (or the error it died with)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, "-m", "bench.train_step", "--_case", json.dumps(case), "--_result", out.name]
        try:
            env = {**os.environ, **case.get("env", {})}
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        except subprocess.TimeoutExpired:
            return {**case, "error": f"timed out after {timeout:.0f} s"}
        text = Path(out.name).read_text()
        if proc.returncode != 0 or not text:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {**case, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
        return json.loads(text)


# ----------------------------------------------------------------------------- tables

def case_label(case: Dict[str, Any]) -> str:
    parts = [{"ocl": "OCL 2 groups", "mae": "MAE", "asl": "ASL"}.get(case["kind"], "full-token ViT step"), case["attn"]]
    if case["ac"] != "none":
        parts.append(f"AC {case['ac']}")
    if case["compile"]:
        parts.append("compile")
    if case.get("adamw", "auto") != "auto":
        parts.append(f"{case['adamw']} AdamW")
    return case.get("label") or ", ".join(parts)


def print_table(results: List[Dict[str, Any]]) -> List[str]:
    header = ("| case | tokens/step | step s (median) | img/s | visible tok/s | GFLOP/step | achieved GFLOP/s "
              "| matmul GFLOP/s | ratio (best) | ratio (median) | speed vs first | step mem | peak mem |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    base = next((r for r in results if "error" not in r), None)
    for r in results:
        if "error" in r:
            lines.append(f"| {case_label(r)} | {r['error']} |")
            continue
        speed = base["step_s_median"] / r["step_s_median"] * (r["batch"] / base["batch"]) if base else float("nan")
        lines.append(
            f"| {case_label(r)} | {r['tokens_per_step']:,} | {r['step_s_median']:.3f} | {r['img_per_s']:.1f} "
            f"| {r['tokens_per_s']:,.0f} | {r['flops_per_step'] / 1e9:.1f} | {r['flops_per_s_best'] / 1e9:.1f} "
            f"| {r['matmul_flops_per_s'] / 1e9:.1f} | {r['ratio']:.3f} | {r['ratio_median']:.3f} "
            f"| {speed:.2f}x | {fmt_bytes(r['step_mem_bytes'])} | {fmt_bytes(r['peak_mem_bytes'])} |")
    return lines


def eager_and_compiled(cases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each eager case twice, eager then with train.compile (at least 3 warm-up steps: compilation is
    not timed), for the side-by-side comparison; skipped and already compiled cases stay as they are."""
    out = []
    for case in cases:
        if "skip" in case or case["compile"]:
            out.append(case)
            continue
        label = case_label(case)
        out += [dict(case, label=f"{label}, eager", compiled_twin=label),
                dict(case, compile=True, warmup=max(case["warmup"], 3), label=f"{label}, compiled",
                     compiled_twin=label)]
    return out


def compile_lines(results: List[Dict[str, Any]]) -> List[str]:
    """compiled / eager of each pair `eager_and_compiled` made: step time and ratio, side by side."""
    eager = {r["compiled_twin"]: r for r in results if "compiled_twin" in r and not r["compile"]}
    lines = []
    for r in results:
        twin = eager.get(r.get("compiled_twin")) if r["compile"] else None
        if twin is None:
            continue
        if "error" in r or "error" in twin:
            lines.append(f"{r['compiled_twin']}: compiled vs eager not measured ({r.get('error') or twin['error']})")
            continue
        lines.append(f"{r['compiled_twin']}: compiled step {r['step_s_median']:.3f} s vs eager "
                     f"{twin['step_s_median']:.3f} s ({twin['step_s_median'] / r['step_s_median']:.2f}x), "
                     f"ratio {r['ratio']:.3f} vs {twin['ratio']:.3f}")
    return lines


# ----------------------------------------------------------------------------- modes

def method_cases(base: Dict[str, Any]) -> List[Dict[str, Any]]:
    """MAE first (the baseline of "speed vs first"), then ASL's two branches on the same encoder,
    mask, decoder and batch (recipes/mae_ and asl_fashion_mnist_cpu.yaml unless --recipe names a model)."""
    common = dict(base, attn="auto", adamw="auto", mask_ratio=0.75)
    mae = str(REPO / "recipes/mae_fashion_mnist_cpu.yaml")
    asl = str(REPO / "recipes/asl_fashion_mnist_cpu.yaml")
    return [dict(common, kind="mae", recipe=mae, label="MAE (baseline)"),
            dict(common, kind="asl", recipe=asl, label="ASL AEE (extra block, 2 decoder passes)"),
            dict(common, kind="asl", recipe=asl, extra=["objective.asl.branch=dle"],
                 label="ASL DLE (2 encoder passes, 2 decoder passes)")]



def compare_cases(base: Dict[str, Any]) -> List[Dict[str, Any]]:
    cuda = base["device"] == "cuda"
    xformers_runs = cuda and not xformers_problem(torch.device("cuda"))
    default_attn = "xformers" if xformers_runs else "sdpa"
    # The baseline is the previous default (SDPA, torch's for-loop AdamW); the second row is today's
    # default (attention auto, AdamW auto): its "speed vs first" is the gain.
    cases = [dict(base, attn=default_attn, adamw="for_loop", label=f"OCL 2 groups, {default_attn}, for-loop AdamW "
                                                                   "(previous default, baseline)"),
             dict(base, attn="auto", adamw="auto", label="OCL 2 groups, default (attention auto, AdamW auto)")]
    for attn in ("sdpa", "math", "xformers"):
        if attn == default_attn:
            continue
        if attn == "xformers" and not xformers_runs:
            cases.append(dict(base, attn=attn, skip="xformers needs CUDA and an xformers build whose kernels run"))
            continue
        cases.append(dict(base, attn=attn, label=f"OCL 2 groups, {attn}"))
    cases += [
        dict(base, attn=default_attn, ac="full", label=f"OCL 2 groups, {default_attn}, AC full"),
        dict(base, attn=default_attn, compile=True, warmup=max(base["warmup"], 3),
             label=f"OCL 2 groups, {default_attn}, compile"),
        dict(base, attn=default_attn, ac="full", compile=True, warmup=max(base["warmup"], 3),
             label=f"OCL 2 groups, {default_attn}, AC full + compile"),
        dict(base, attn=default_attn, adamw="fused", label=f"OCL 2 groups, {default_attn}, fused AdamW"),
        dict(base, attn="auto", adamw="auto", kind="mae", recipe=str(REPO / "recipes/mae_fashion_mnist_cpu.yaml"),
             mask_ratio=0.75,
             label="MAE (mask 0.75, decoder of mae_fashion_mnist_cpu.yaml), default"),
        dict(base, attn=default_attn, threads=1, label=f"OCL 2 groups, {default_attn}, 1 thread (vs 1-thread GEMM)"),
        dict(base, attn=default_attn, env={"OMP_WAIT_POLICY": "PASSIVE"},
             label=f"OCL 2 groups, {default_attn}, OMP_WAIT_POLICY=PASSIVE"),
        dict(base, attn=default_attn, kind="full", label=f"full-token ViT step, {default_attn}"),
        dict(base, attn=default_attn, kind="full", compile=True, warmup=max(base["warmup"], 3),
             label=f"full-token ViT step, {default_attn}, compile"),
    ]
    return cases


def memory_sweep(base: Dict[str, Any], presets: List[str], batches: Tuple[int, int], cap: float,
                 verify: Optional[str], timeout: float) -> Dict[str, Any]:
    """Peak RSS at two batch sizes per preset -> bytes per image -> largest batch under `cap`."""
    rows = []
    for name in presets:
        spec = MODELS.build(name)
        for ac in base["sweep_ac"]:
            points = []
            for b in batches:
                r = run_child(dict(base, model=name, batch=b, ac=ac, steps=1, warmup=1), timeout)
                if "error" in r:
                    raise SystemExit(f"{name} batch {b}: {r['error']}")
                points.append(r)
            (b1, r1), (b2, r2) = zip(batches, points)
            slope = (r2["peak_mem_bytes"] - r1["peak_mem_bytes"]) / (b2 - b1)
            fixed = r1["peak_mem_bytes"] - slope * b1
            max_batch = int((cap - fixed) // slope)
            n, tokens = ocl_tokens_per_image(spec, base["mask_ratio"])
            formula = activation_bytes_per_image(spec, tokens, bf16=False, checkpointed=ac == "full")
            row = {"model": name, "activation_checkpointing": ac, "batches": list(batches),
                   "peak_rss_bytes": [r1["peak_mem_bytes"], r2["peak_mem_bytes"]],
                   "bytes_per_image": slope, "fixed_bytes": fixed, "formula_bytes_per_image": formula,
                   "max_batch_extrapolated": max_batch}
            if verify == name and ac == base["sweep_ac"][0]:
                r = run_child(dict(base, model=name, batch=max_batch, ac=ac, steps=1, warmup=1), timeout * 4)
                row["verified"] = {"batch": max_batch, "peak_rss_bytes": r.get("peak_mem_bytes"),
                                   "predicted_bytes": fixed + slope * max_batch, "error": r.get("error")}
            rows.append(row)
            print(f"{name:22s} AC {ac:4s}: {fmt_bytes(r1['peak_mem_bytes'])} @ {b1}, {fmt_bytes(r2['peak_mem_bytes'])} "
                  f"@ {b2} -> {slope / 2 ** 20:.2f} MiB/img (formula {formula / 2 ** 20:.2f}), fixed "
                  f"{fmt_bytes(fixed)} -> max batch {max_batch} under {fmt_bytes(cap)}"
                  + (f" | verified: peak {fmt_bytes(row['verified']['peak_rss_bytes'] or 0)} "
                     f"(predicted {fmt_bytes(row['verified']['predicted_bytes'])})" if "verified" in row else ""),
                  flush=True)
    return {"cap_bytes": cap, "rows": rows}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model preset (default: the recipe's)")
    p.add_argument("--recipe", help="recipe the run is built on (default recipes/ocl_cpu_tiny.yaml); without "
                                    "it, --model takes its batch and mask ratio from the recipe using that model")
    p.add_argument("--batch", type=int, help="per-device micro-batch (default: the recipe's)")
    p.add_argument("--mask-ratio", type=float, help="default: the recipe's")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--attn", default="auto", choices=("auto", "sdpa", "math", "xformers"))
    p.add_argument("--ac", default="none", help="activation checkpointing: none | full | every_<k> | 0,2,5")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--eager-and-compiled", action="store_true",
                   help="run every case eager and with train.compile, side by side")
    p.add_argument("--adamw", default="auto", choices=("auto", "fused", "foreach", "for_loop"),
                   help="optim.implementation: the AdamW kernel")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="repeat every case this often, interleaved; "
                                                       "times and references are pooled (best-of)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--gemm-size", type=int, default=0, help="reference GEMM size (default 2048 CPU, 4096 CUDA)")
    p.add_argument("--gemm-repeats", type=int, default=5)
    p.add_argument("--compare", action="store_true", help="attention backends, AC, compile, full-token step")
    p.add_argument("--methods", action="store_true", help="MAE vs ASL (AEE, DLE): step cost and FLOP ratio")
    p.add_argument("--memory-sweep", action="store_true", help="largest micro-batch per small preset (CPU)")
    p.add_argument("--sweep-batches", default="64,256")
    p.add_argument("--sweep-ac", default="none,full")
    p.add_argument("--presets", default=",".join(SMALL_PRESETS))
    p.add_argument("--mem-cap-gb", type=float, default=16.0, help="memory cap (GiB) for --memory-sweep")
    p.add_argument("--verify", default="vit_tiny_patch4_28", help="preset whose extrapolated max batch is run")
    p.add_argument("--estimate", action="store_true", help="GPU (80 GB) micro-batch estimate for ViT-B/L/H")
    p.add_argument("--timeout", type=float, default=1800.0, help="per case, seconds")
    p.add_argument("--out", help="write JSON here")
    p.add_argument("--_case", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._case:  # child
        result = run_case(json.loads(args._case))
        Path(args._result).write_text(json.dumps(result))
        return 0

    if args.estimate:
        rows = gpu_estimates()
        print("| model | step | tokens/img | AC | params | model+AdamW state | activations/img | max micro-batch (est.) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['kind']} | {r['tokens_per_image']} | {r['activation_checkpointing']} "
                  f"| {r['params_M']:.0f}M | {r['model_state_GiB']:.1f} GiB | {r['activation_MiB_per_image']:.1f} MiB "
                  f"| {r['max_batch_estimate']} |")
        if args.out:
            Path(args.out).write_text(json.dumps({"gpu_estimate": rows}, indent=1))
        return 0

    # An absolute path: the cases run in children started in the repository root.
    recipe = Path(args.recipe).resolve() if args.recipe else DEFAULT_RECIPE
    rcfg = load_config(recipe)
    paper = recipe_defaults(args.model) if not args.recipe else {}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    base = {
        "recipe": str(recipe), "model": args.model or rcfg.model.name,
        "batch": args.batch or paper.get("batch") or rcfg.train.micro_batch or plan_batch(rcfg.train, 1).per_rank_batch,
        "mask_ratio": args.mask_ratio if args.mask_ratio is not None else paper.get("mask_ratio") or rcfg.mask.ratio,
        "defaults_from": paper.get("recipe", str(recipe)), "device": args.device,
        "precision": args.precision, "attn": args.attn, "ac": args.ac, "compile": args.compile, "kind": "ocl",
        "adamw": args.adamw,
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "gemm_size": args.gemm_size,
        "gemm_repeats": args.gemm_repeats, "sweep_ac": args.sweep_ac.split(","),
    }
    env = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": args.threads, "loadavg_start": os.getloadavg(),
           "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))},
           "cuda": torch.cuda.get_device_name() if args.device == "cuda" else None}
    print(f"# {base['model']} batch {base['batch']} mask {base['mask_ratio']} on {args.device} "
          f"({args.threads} threads, torch {torch.__version__}), load average {env['loadavg_start'][0]:.2f}", flush=True)

    if args.memory_sweep:
        b1, b2 = (int(x) for x in args.sweep_batches.split(","))
        out = memory_sweep(base, args.presets.split(","), (b1, b2), args.mem_cap_gb * GIB, args.verify, args.timeout)
        if args.out:
            Path(args.out).write_text(json.dumps({"env": env, "memory_sweep": out}, indent=1))
        return 0

    cases = compare_cases(base) if args.compare else method_cases(base) if args.methods else [base]
    if args.eager_and_compiled:
        cases = eager_and_compiled(cases)
    per_case: List[List[Dict[str, Any]]] = [[] for _ in cases]
    for round_ in range(args.rounds):  # interleaved: every case sees the same mix of quiet and busy moments
        for case, runs in zip(cases, per_case):
            if "skip" in case:
                runs[:] = [{**case, "error": f"skipped: {case['skip']}"}]
                continue
            r = run_child(case, args.timeout)
            runs.append(r)
            status = r.get("error") or f"ratio {r['ratio']:.3f}, {r['img_per_s']:.1f} img/s"
            print(f"  [round {round_ + 1}/{args.rounds}] {case_label(case)}: {status} "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    results = [merge_rounds(runs) for runs in per_case]
    env["loadavg_end"] = os.getloadavg()
    lines = print_table(results)
    print("\n".join(lines + compile_lines(results)))
    first = next((r for r in results if "error" not in r), None)
    if args.methods and first is not None:
        for r in results[1:]:
            if "error" not in r:
                print(f"{case_label(r)} / {case_label(first)}: step time {r['step_s_median'] / first['step_s_median']:.2f}x, "
                      f"FLOPs {r['flops_per_step'] / first['flops_per_step']:.2f}x, ratio {r['ratio']:.3f} vs {first['ratio']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "results": results}, indent=1))
    if first is None:
        print("ratio=nan (every case failed)")
        return 1
    print(f"load average {env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f}; "
          f"ratio = train-step FLOP/s (best step) / {'bf16' if args.device == 'cuda' else 'fp32'} matmul FLOP/s; "
          f"{first['model']} batch {first['batch']} on {args.device}: ratio={first['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
