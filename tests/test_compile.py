"""train.compile: the encoder blocks, the objective's blocks and each objective's loss compile whole.

- no graph breaks (`torch._dynamo.explain`) in any compiled region of the OCL, MAE, ASL and EHM recipes;
- a run compiles during its first steps and then no more than once across 20 steps (masks keep every
  shape static, EHM's included: its model signal's hook sits outside the compiled block);
- the compiled step (inductor, the real backend) equals the eager one within fp32 tolerance, with
  gradient caching.

Dynamo's own tracing is what these tests check, so most run it with backend="eager" (no C++ build on
2 cores); one test compiles with inductor. FSDP2 and DDP with compile: tests/test_throughput_switches.py.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from scale.config import load_config
from scale.engine.block_wrappers import apply_compile
from scale.engine.parallelize import apply_block_wrappers
from scale.masking import MaskContext, build_mask_generator, step_generator
from scale.pretraining import build_pretrain_module
from conftest import REPO, tiny_overrides
from test_throughput_switches import batch_and_masks, build, micro_cfg, run_steps

BATCH = 8  # run_steps' batch
# Each recipe on synthetic 28x28 images; the patch-7 grid (16 patches) keeps EHM's trees small.
RECIPES = {
    "ocl": ("ocl_cpu_tiny.yaml", ()),
    "mae": ("mae_fashion_mnist_cpu.yaml", ("model.name=vit_tiny_patch7_28",)),
    "asl": ("asl_fashion_mnist_cpu.yaml", ("model.name=vit_tiny_patch7_28",)),
    "ehm": ("ehm_fashion_mnist_cpu.yaml", ("model.name=vit_tiny_patch7_28",)),
}


def recipe_cfg(tmp_path, method, *overrides):
    recipe, extra = RECIPES[method]
    return load_config(REPO / "recipes" / recipe, tiny_overrides(
        "data.name=synthetic", f"train.micro_batch={BATCH}", "data.num_samples=64",
        f"train.output_dir={tmp_path / 'run'}", *extra, *overrides))


@pytest.fixture
def eager_backend(monkeypatch):
    """torch.compile with dynamo's tracing, guards and recompilation, minus inductor's code generation."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    yield
    torch._dynamo.reset()


def one_batch(cfg, module):
    images = torch.randn(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")
    context = MaskContext(step_generator(0, 0, 0, cpu), cpu, images=images,
                          model_signal=lambda x: module.model_signal(x, generator.needs.model_signal))
    generator = build_mask_generator(cfg.mask, module.encoder.spec.grid_size)
    return images, generator(BATCH, context)


def recorded_calls(module, images, masks):
    """(function, args, grad enabled) of every call one eager forward makes to a compiled region: each block's
    forward and each declared loss method, as the step calls them."""
    plan = module.parallel_plan()
    regions = [(block, "forward") for block in [*plan.encoder_blocks, *plan.objective_blocks]] + plan.loss_methods
    calls = []

    def recorder(fn):
        def record(*args, **kwargs):
            calls.append((fn, args, kwargs, torch.is_grad_enabled()))
            return fn(*args, **kwargs)
        return record

    for owner, name in regions:
        setattr(owner, name, recorder(getattr(owner, name)))
    try:
        module(images, masks)
    finally:
        for owner, name in regions:
            delattr(owner, name)
    return calls


@pytest.mark.parametrize("method", list(RECIPES))
def test_objective_declares_its_loss_and_compile_wraps_it(tmp_path, method, eager_backend):
    """train.compile compiles the declared loss in place, besides every block; names stay timm's."""
    cfg = recipe_cfg(tmp_path, method, "train.compile=true")
    module = build_pretrain_module(cfg)
    names = list(module.state_dict())
    losses = module.objective.loss_methods()
    assert losses, f"{method}'s objective declares no loss to compile"
    report = apply_block_wrappers(module, cfg.train)
    plan = module.parallel_plan()
    assert report["compiled_blocks"] == len(plan.encoder_blocks) + len(plan.objective_blocks)
    assert all(name in vars(module.objective) for name in losses)  # shadowed by its compiled form
    assert list(module.state_dict()) == names


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RECIPES))
def test_no_graph_breaks(tmp_path, method, eager_backend):
    """Every block (encoder and objective, with and without grad, with activation checkpointing) and the
    objective's loss trace into one graph each."""
    cfg = recipe_cfg(tmp_path, method)
    torch.manual_seed(0)
    module = build_pretrain_module(cfg)
    images, masks = one_batch(cfg, module)
    calls = recorded_calls(module, images, masks)
    assert len(calls) >= len(module.parallel_plan().encoder_blocks) + 1
    with torch.no_grad():
        calls += recorded_calls(module, images, masks)[:1]  # gradient caching's first pass
    explained_once = set()
    for fn, args, kwargs, grad in calls:
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        if (fn.__qualname__, shapes, grad) in explained_once:  # the same code on the same shapes: one graph
            continue
        explained_once.add((fn.__qualname__, shapes, grad))
        with torch.set_grad_enabled(grad):
            explained = torch._dynamo.explain(fn)(*args, **kwargs)
        assert explained.graph_break_count == 0, (fn, explained.break_reasons)
        assert explained.graph_count == 1, fn
    checkpointed_cfg = recipe_cfg(tmp_path, method, "train.activation_checkpointing=full")
    checkpointed = build_pretrain_module(checkpointed_cfg)
    apply_block_wrappers(checkpointed, checkpointed_cfg.train)  # compile off: the checkpointed forward as it is
    block_call = recorded_calls(checkpointed, images, masks)[0]
    explained = torch._dynamo.explain(block_call[0])(*block_call[1], **block_call[2])
    assert explained.graph_break_count == 0, explained.break_reasons


WARM_UP_STEPS = 2
STEPS = 20
MAX_WARM_UP_GRAPHS = 4


@pytest.mark.slow
# OCL in make test, the rest in the long tier, where they run after it: EHM run first in a process compiles one
# graph more in warm-up (5) than the bound, which it keeps when the blocks' graphs already exist. EHM's hook outside
# the compiled forward is guarded in make test by test_attention_signal_hooks_the_block_outside_its_compiled_forward.
@pytest.mark.parametrize("method", [m if m == "ocl" else pytest.param(m, marks=pytest.mark.long) for m in RECIPES])
def test_at_most_one_recompilation_after_warm_up(tmp_path, method, eager_backend):
    """Across 20 steps, graphs are compiled in the first steps, a few per run, and at most once after (a
    region recompiled at every call would reach dynamo's recompile limit and silently run eagerly); the
    losses are the eager run's."""
    def frames_compiled(steps):
        torch._dynamo.reset()
        before = counters["frames"]["total"]
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            losses, _, _ = run_steps(recipe_cfg(tmp_path / f"compiled_{steps}", method, "train.compile=true"), steps)
        return counters["frames"]["total"] - before, losses

    warm, _ = frames_compiled(WARM_UP_STEPS)
    # One graph per variant, not one per block or per call: the encoder block with grad and without (EHM's
    # signal in eval mode, gradient caching's first pass), the objective's blocks, the loss.
    assert 0 < warm <= MAX_WARM_UP_GRAPHS, warm
    frames, losses = frames_compiled(STEPS)
    assert frames - warm <= 1, (warm, frames)
    reference, _, _ = run_steps(recipe_cfg(tmp_path / "eager", method), STEPS)
    assert losses == pytest.approx(reference, rel=1e-5, abs=1e-6)


@pytest.mark.slow
@pytest.mark.long  # make test keeps test_inductor_blocks_replay_drop_path_for_gradient_caching and the OCL recompile count
def test_inductor_step_equals_eager_with_gradient_caching(tmp_path):
    """The real backend: OCL's compiled blocks and loss, gradient caching 8 images in chunks of 4, within
    fp32 tolerance of eager. Without drop path: compiled random ops draw other numbers than eager's."""
    torch._dynamo.reset()
    common = ("train.global_batch=8", "train.micro_batch=4", "model.drop_path_rate=0.0")
    reference, _, _ = run_steps(recipe_cfg(tmp_path / "eager", "ocl", *common), 3)
    losses, _, _ = run_steps(recipe_cfg(tmp_path / "inductor", "ocl", *common, "train.compile=true"), 3)
    assert losses == pytest.approx(reference, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_inductor_blocks_replay_drop_path_for_gradient_caching(tmp_path):
    """Gradient caching re-embeds each chunk with grad after restoring the RNG state of its no-grad pass: the
    compiled blocks (two graphs, with and without grad) must draw the same drop-path masks in both."""
    torch._dynamo.reset()
    cfg = micro_cfg(tmp_path, "model.drop_path_rate=0.3")
    module = build(cfg)
    apply_compile(module.encoder)
    images, masks = batch_and_masks(cfg)
    for _ in range(2):  # compiling, then the cached graphs
        state = torch.get_rng_state()
        with torch.no_grad():
            first = module.encode(images, masks).cls
        torch.set_rng_state(state)
        assert torch.equal(module.encode(images, masks).cls, first)


def test_train_step_bench_pairs_each_case_eager_and_compiled():
    """bench/train_step.py --eager-and-compiled: every eager case followed by its compiled twin (compilation
    in the warm-up, not timed), and one line per pair with both step times and ratios."""
    from bench.train_step import compile_lines, eager_and_compiled

    base = {"kind": "ocl", "attn": "math", "ac": "none", "compile": False, "warmup": 1}
    cases = eager_and_compiled([base, dict(base, kind="mae"), dict(base, compile=True, label="already compiled"),
                                dict(base, skip="no xformers")])
    assert [(c.get("label"), c["compile"], c["warmup"]) for c in cases] == [
        ("OCL 2 groups, math, eager", False, 1), ("OCL 2 groups, math, compiled", True, 3),
        ("MAE, math, eager", False, 1), ("MAE, math, compiled", True, 3),
        ("already compiled", True, 1), (None, False, 1)]
    timed = [dict(c, step_s_median=s, ratio=r) for c, s, r in zip(cases[:2], (0.5, 0.25), (0.3, 0.6))]
    failed = [cases[2], dict(cases[3], error="exit 1: no C++ compiler")]
    assert compile_lines(timed + failed + cases[4:]) == [
        "OCL 2 groups, math: compiled step 0.250 s vs eager 0.500 s (2.00x), ratio 0.600 vs 0.300",
        "MAE, math: compiled vs eager not measured (exit 1: no C++ compiler)"]


def test_attention_signal_hooks_the_block_outside_its_compiled_forward(tmp_path):
    """EHM's signal reads each block's attention from a hook on the block (which runs outside a compiled
    forward), the same probabilities as the attention's own input gives: softmax(q k^T) of norm1(x)."""
    module = build_pretrain_module(recipe_cfg(tmp_path, "ehm"))
    encoder = module.encoder
    images = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    x = torch.cat([(encoder.cls_token + encoder.pos_embed[:, :1]).expand(3, -1, -1), encoder.embed_patches(images)],
                  dim=1)
    expected = []
    with torch.no_grad():
        encoder.eval()
        for block in encoder.blocks[:2]:
            expected.append(block.attn.attention_probs(block.norm1(x)).mean(dim=1))
            x = block(x)
        encoder.train()
        assert torch.equal(encoder.attention_maps(images, 2), torch.stack(expected).mean(dim=0))
    assert all(not block.attn._forward_pre_hooks and not block._forward_pre_hooks for block in encoder.blocks)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.long
def test_fsdp2_on_two_ranks_with_compile_and_gradient_caching_trains_like_eager(tmp_path):
    """FSDP2 on 2 ranks (gloo): every block its own unit with its hooks outside the compiled forward, OCL's
    compiled loss after the autograd all-gather, 16 images per rank in gradient-cached chunks of 8: the
    losses equal the eager run's within fp32 tolerance, and the resume continues them."""
    from test_distributed import torchrun_worker

    chunks = ("--set", "train.micro_batch=8")
    eager = torchrun_worker(tmp_path / "eager", "train", "fsdp", *chunks)[("train", 0)]["fsdp"]
    compiled = torchrun_worker(tmp_path / "compiled", "train", "fsdp", *chunks,
                               "--set", "train.compile=true")[("train", 0)]["fsdp"]
    assert compiled["world_size"] == 2
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4, abs=1e-5)
    assert compiled["resumed_losses"] == pytest.approx(compiled["losses"][2:], rel=1e-4, abs=1e-5)
