"""Recipes of the linear probe and fine-tuning: dataclasses read from YAML + dotted overrides
with scale.config's own merge and type coercion (same errors, same override syntax).

Values and where they come from (OCL paper Tables 10/11 unless marked MAE):

| | linear probe (Table 11) | fine-tune (Table 10) |
|---|---|---|
| epochs | 90 (B) / 50 (L) | 100 (B) / 50 (L) |
| warm-up epochs | 10 | 5 |
| optimizer | LARS (MAE: momentum 0.9, trust 0.001, no wd/trust on 1-D) | AdamW, betas (0.9, 0.95) |
| base lr (lr = blr * batch / 256) | 0.1 | 5e-4 (B) / 1e-3 (L) |
| schedule | cosine | cosine (MAE: min lr 1e-6) |
| weight decay | 0 | 0.05 |
| global batch (the optimiser's) | 16384 (B) / 1024 (L) | 1024 |
| MAE-only extras | BatchNorm1d(affine=False) head, trunc-normal 0.01, RandomResizedCrop(0.08-1) + flip | layer decay 0.65 (B) / 0.75 (L), drop path 0.1 (B) / 0.2 (L), mixup 0.8, cutmix 1.0, label smoothing 0.1, random erasing 0.25, head init trunc-normal 2e-5 |

MAE fine-tunes with AdamW betas (0.9, 0.999); the OCL paper's Table 10 lists (0.9, 0.95),
which the recipes follow (`finetune.betas` changes it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Optional, Sequence, Set, Tuple, Type, TypeVar


from ..config import ConfigError, DataConfig, ModelConfig, RunConfig, apply_overrides, merge_recipe, validate


def _probe_data() -> DataConfig:
    # MAE's linear-probe training transform: RandomResizedCrop(scale 0.08-1, bicubic) + flip.
    return DataConfig(transform="mae", crop_scale=(0.08, 1.0))


def _finetune_data() -> DataConfig:
    # RandomResizedCrop(0.08-1) + flip; MAE adds RandAugment (not available in scale.data).
    return DataConfig(transform="mae", crop_scale=(0.08, 1.0))


@dataclass
class LinearProbeConfig:
    num_classes: int = 1000
    epochs: int = 90
    warmup_epochs: float = 10.0
    global_batch: int = 16384  # images of one head step (one process): what the optimiser sees
    micro_batch: int = 256  # images per frozen-encoder forward; global_batch must be a multiple
    blr: float = 0.1
    lr: Optional[float] = None  # absolute lr; overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9  # MAE's LARS
    trust_coeff: float = 0.001  # MAE's LARS
    # Extract un-augmented features once and train the head on them (fast; MAE augments every epoch).
    cache_features: bool = False
    eval_every_epochs: int = 0  # 0: evaluate after the last epoch only
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32


@dataclass
class FinetuneConfig:
    num_classes: int = 1000
    epochs: int = 100
    warmup_epochs: float = 5.0
    global_batch: int = 1024  # images of one optimizer step (one process): what the optimiser sees
    micro_batch: int = 128  # images per forward/backward; global_batch must be a multiple (accumulation)
    blr: float = 5e-4
    lr: Optional[float] = None
    min_lr: float = 1e-6  # MAE
    betas: Tuple[float, float] = (0.9, 0.95)  # paper Table 10 (MAE: 0.9, 0.999)
    weight_decay: float = 0.05
    layer_decay: float = 0.65  # MAE ViT-B
    drop_path: float = 0.1  # MAE ViT-B
    mixup: float = 0.8  # MAE
    cutmix: float = 1.0  # MAE
    mixup_prob: float = 1.0  # MAE
    mixup_switch_prob: float = 0.5  # MAE
    label_smoothing: float = 0.1  # MAE
    random_erasing: float = 0.25  # MAE's reprob (pixel mode, one box), applied on the batch
    clip_grad: Optional[float] = None  # MAE: none
    global_pool: str = "token"  # token: the [CLS] OCL trains | avg: MAE's default (mean of patch tokens + fc_norm)
    head_init_std: float = 2e-5  # MAE
    eval_every_epochs: int = 1
    max_steps: Optional[int] = None  # stop early (the schedule still spans all epochs)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"


@dataclass
class LinearProbeRecipe:
    model: ModelConfig = field(default_factory=ModelConfig)  # only for checkpoints without a saved config
    data: DataConfig = field(default_factory=_probe_data)  # root: labelled train split; val_root: evaluation
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)


@dataclass
class FinetuneRecipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=_finetune_data)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


Recipe = TypeVar("Recipe", LinearProbeRecipe, FinetuneRecipe)


def load_recipe(cls: Type[Recipe], path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Recipe:
    """Defaults, then the YAML recipe (a path or a recipe name), then `key=value` overrides; validated
    before any work."""
    cfg = cls()
    user_keys: Set[str] = set()
    if path is not None:
        merge_recipe(cfg, path, user_keys)
    apply_overrides(cfg, overrides, example="probe.blr=0.05", user_keys=user_keys)
    validate_recipe(cfg, user_keys)
    return cfg


def validate_recipe(cfg: LinearProbeRecipe | FinetuneRecipe, user_keys: AbstractSet[str] = frozenset()) -> None:
    def require(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    validate(RunConfig(model=cfg.model, data=cfg.data), user_keys)  # the shared model/data checks
    section, name = (cfg.probe, "probe") if isinstance(cfg, LinearProbeRecipe) else (cfg.finetune, "finetune")
    require(section.num_classes >= 2, f"{name}.num_classes must be >= 2, got {section.num_classes}")
    require(section.epochs >= 1, f"{name}.epochs must be >= 1, got {section.epochs}")
    require(0 <= section.warmup_epochs <= section.epochs,
            f"{name}.warmup_epochs must be in [0, {name}.epochs], got {section.warmup_epochs}")
    require(section.blr > 0 or (section.lr or 0) > 0, f"{name}.blr (or {name}.lr) must be > 0")
    require(section.weight_decay >= 0, f"{name}.weight_decay must be >= 0")
    require(section.device in ("auto", "cpu", "cuda"), f"{name}.device must be auto, cpu or cuda")
    require(section.precision in ("auto", "bf16", "fp32"), f"{name}.precision must be auto, bf16 or fp32")
    require(section.eval_every_epochs >= 0, f"{name}.eval_every_epochs must be >= 0")
    if isinstance(cfg, LinearProbeRecipe):
        p = cfg.probe
        require(p.micro_batch >= 1 and p.global_batch >= 2, "probe.global_batch must be >= 2, probe.micro_batch >= 1")
        require(p.cache_features or p.global_batch % p.micro_batch == 0,
                f"probe.global_batch ({p.global_batch}) must be a multiple of probe.micro_batch ({p.micro_batch})")
    else:
        f = cfg.finetune
        require(f.micro_batch >= 2 and f.global_batch % f.micro_batch == 0,
                f"finetune.global_batch ({f.global_batch}) must be a multiple of finetune.micro_batch "
                f"({f.micro_batch}), which must be >= 2")
        require((f.mixup <= 0 and f.cutmix <= 0) or f.micro_batch % 2 == 0,
                "finetune.micro_batch must be even for mixup/cutmix")
        require(0 < f.layer_decay <= 1, f"finetune.layer_decay must be in (0, 1], got {f.layer_decay}")
        require(0 <= f.drop_path < 1, f"finetune.drop_path must be in [0, 1), got {f.drop_path}")
        require(0 <= f.label_smoothing < 1, "finetune.label_smoothing must be in [0, 1)")
        require(0 <= f.random_erasing <= 1, "finetune.random_erasing must be in [0, 1]")
        require(f.global_pool in ("token", "avg"), f"finetune.global_pool must be token or avg, got {f.global_pool!r}")
        require(f.max_steps is None or f.max_steps >= 1, "finetune.max_steps must be >= 1 or null")
