"""The seam: a new objective and a new mask generator plug in from this file alone, through the
registries and the method contract, with no change to the trainer, the engines or the config: each
brings its own config keys (a dataclass registered with its builder) and checks its own values."""
from dataclasses import dataclass
from typing import List

import pytest
import torch
import torch.nn as nn

from conftest import tiny_config
from scale.config import Check, ConfigError, MaskConfig, ObjectiveConfig, to_dict
from scale.masking import MASK_GENERATORS, MaskContext, MaskGenerator, MaskNeeds, Masks, SignalRequest
from scale.models import ViTSpec
from scale.objectives import OBJECTIVES, Objective, ObjectiveBatch, ObjectiveNeeds, ObjectiveOutput
from scale.trainer import Trainer

SEEN = {"contexts": [], "batches": []}


class ToyTokenRegression(Objective):
    """Predicts each visible token's patch mean from its feature: per-image, needs tokens and images."""

    needs = ObjectiveNeeds(tokens=True, images=True)
    couples_batch = False
    num_groups = 1

    def __init__(self, spec: ViTSpec, target_scale: float = 1.0):
        super().__init__()
        self.spec, self.target_scale = spec, target_scale
        self.head = nn.Linear(spec.embed_dim, 1)
        self.block = nn.Sequential(nn.Linear(spec.embed_dim, spec.embed_dim), nn.GELU())

    def forward(self, batch: ObjectiveBatch, gather=None) -> ObjectiveOutput:
        SEEN["batches"].append((tuple(batch.tokens.shape), batch.images is not None))
        p = self.spec.patch_size
        patches = batch.images.unfold(2, p, p).unfold(3, p, p).mean(dim=(-1, -2)).flatten(1)  # (B, N)
        target = self.target_scale * patches.gather(1, batch.masks.group_ids[:, 0])
        pred = self.head(self.block(batch.tokens[:, 0])).squeeze(-1)
        return ObjectiveOutput(((pred - target) ** 2).mean(), {"toy_target_mean": target.mean().detach()})

    def blocks(self) -> List[nn.Module]:
        return [self.block]


class ToyAttentionMasking(MaskGenerator):
    """Keeps the patches the [CLS] attends to least (ties broken by the step's generator)."""

    num_groups = 1

    def __init__(self, grid_size: int, ratio: float, blocks: int = 6):
        super().__init__(grid_size)
        self.keep = int(self.num_patches * (1 - ratio))
        self.needs = MaskNeeds(model_signal=SignalRequest("attention", blocks=blocks))

    def __call__(self, batch_size: int, context: MaskContext) -> Masks:
        attention = context.model_signal(context.images)  # (B, 1 + N, 1 + N), through the engine
        SEEN["contexts"].append((context.step, context.progress, tuple(attention.shape)))
        noise = torch.rand(batch_size, self.num_patches, generator=context.generator, device=context.device)
        order = torch.argsort(attention[:, 0, 1:] + 1e-3 * noise, dim=1)
        return Masks(group_ids=order[:, :self.keep].unsqueeze(1), masked_ids=order[:, self.keep:])


@dataclass
class ToyRegressionConfig:
    """The toy objective's own key: objective.target_scale."""
    target_scale: float = 1.0

    def validate(self, check: Check) -> None:
        check.range("target_scale", self.target_scale, 0.0, 10.0, low_open=True)


@dataclass
class ToyAttentionConfig:
    """The toy generator's own key: mask.signal_blocks."""
    signal_blocks: int = 6

    def validate(self, check: Check) -> None:
        check.range("signal_blocks", self.signal_blocks, 1)


OBJECTIVES.register("toy_token_regression", config=ToyRegressionConfig)(
    lambda cfg, spec: ToyTokenRegression(spec, cfg.target_scale))
MASK_GENERATORS.register("toy_attention", config=ToyAttentionConfig)(
    lambda cfg, grid: ToyAttentionMasking(grid, cfg.ratio, cfg.signal_blocks))
TOY = ("objective.name=toy_token_regression", "mask.name=toy_attention", "mask.ratio=0.5")


def test_a_new_objective_and_mask_generator_train_through_the_registries(tmp_path):
    assert isinstance(ObjectiveConfig(name="toy_token_regression"), ToyRegressionConfig)
    assert isinstance(MaskConfig(name="toy_attention"), MaskConfig)
    cfg = tiny_config(tmp_path, *TOY, "objective.target_scale=2.5", "mask.signal_blocks=4",
                      "train.max_steps=3", "train.global_batch=16", "train.micro_batch=8")
    assert to_dict(cfg)["objective"] == {"name": "toy_token_regression", "target_scale": 2.5}  # no OCL keys
    summary = Trainer(cfg).fit()
    assert summary.steps_done == 3 and all(torch.isfinite(torch.tensor(summary.losses)))
    assert [c[0] for c in SEEN["contexts"]] == [0, 1, 2]
    assert SEEN["contexts"][1][1] == 1 / 32  # progress: step / (2 epochs x 16 steps of 16 images)
    assert SEEN["contexts"][0][2] == (16, 50, 50)
    # accumulation in two micro-batches of 8 (the toy loss does not couple the batch)
    assert SEEN["batches"][0] == ((8, 1, 24, 192), True)


@pytest.mark.parametrize("override, message", [
    ("objective.target_scale=0", "objective.target_scale must be in (0, 10]"),
    ("mask.signal_blocks=0", "mask.signal_blocks must be in [1, inf]"),
    ("objective.kappa=32", "objective.kappa has no effect: objective.name is toy_token_regression"),
    ("objective.bogus=1", "unknown config key 'objective.bogus'"),
])
def test_a_new_methods_keys_are_checked_by_its_own_config(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, *TOY, override)
    assert message in str(err.value)
    with pytest.raises(ConfigError, match="objective.target_scale has no effect: objective.name is mae"):
        tiny_config(tmp_path, *TOY, "objective.target_scale=2", "objective.name=mae")


@pytest.mark.slow
def test_the_trainer_imports_no_evaluation_code_and_probes_no_engine():
    import subprocess
    import sys

    from conftest import REPO, python_env

    code = ("import sys, scale.trainer, scale.engine; "
            "print(sorted(m for m in sys.modules if m.startswith('scale.eval')))")
    out = subprocess.run([sys.executable, "-c", code], env=python_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # monitors are handed in: no trainer -> eval import
    for path in [*(REPO / "scale/trainer").glob("*.py"), REPO / "scale/engine/grad_cache.py",
                 REPO / "scale/engine/accumulation.py", REPO / "scale/eval/knn.py"]:
        text = path.read_text()
        for probe in ("getattr(self.engine", "getattr(engine", "hasattr(engine", "engine.name ==", ".name == \"fsdp\""):
            assert probe not in text, (path, probe)
