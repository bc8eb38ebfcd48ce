"""Typed run configuration: YAML recipes -> nested dataclasses, with dotted CLI overrides.

Every key is validated against the dataclass fields before any work starts; an unknown
key or a value of the wrong type raises ConfigError naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe or override that does not match the config schema."""


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch4_28"
    img_size: Optional[int] = None  # None: the preset's own size
    in_chans: Optional[int] = None  # None: the preset's own channel count
    train_patch_embed: bool = False  # paper: frozen; the public code trains it
    attn_backend: str = "auto"  # auto | xformers | sdpa | math
    drop_path_rate: float = 0.0


@dataclass
class MaskConfig:
    name: str = "random_two_group"
    ratio: float = 0.3  # fraction of patches masked globally


@dataclass
class HeadConfig:
    layers: int = 0  # 0: no head (paper default); 2 or 3: MoCo v3-style MLP head
    hidden_dim: int = 1024
    out_dim: int = 512


@dataclass
class ObjectiveConfig:
    name: str = "ocl"
    kappa: float = 64.0  # T-SP concentration; .inf gives (1 + c) / 2
    init_temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5
    learn_temperature: bool = True
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | image_folder | webdataset | ...
    root: str = ""  # folder (image_folder) or shard URL pattern (webdataset)
    val_root: str = ""  # held-out split for monitors (webdataset: its shard pattern)
    num_samples: int = 8192  # synthetic size, or samples per epoch in resampled streams
    num_classes: int = 10  # synthetic only
    transform: str = "mae"  # mae | none
    crop_scale: Tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)
    num_workers: int = 2
    resampled: bool = False  # webdataset: infinite stream cut into fixed-size epochs
    manifest: str = ""  # webdataset: manifest path (default: next to the shards)
    shuffle_buffer: int = 1000  # webdataset: in-worker sample shuffle buffer (0: off)


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # lr = blr * effective_batch / 256
    lr: Optional[float] = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_epochs: float = 40.0
    clip_grad: Optional[float] = None


@dataclass
class TrainConfig:
    epochs: int = 800
    batch_size: int = 64  # per device micro-batch
    max_steps: Optional[int] = None  # stop early (the schedule still spans all epochs)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    output_dir: str = "runs/default"
    resume: str = ""  # "" (fresh) | auto | path to a checkpoint
    # Gradient caching (GradCache): the global batch whose embeddings are scored together, and how
    # many images one rank encodes per forward/backward pass. contrastive_batch null: batch_size
    # images per rank; set: contrastive_batch / world_size per rank (must divide evenly).
    # grad_cache_chunk null (or >= the per-rank batch): one pass, no caching.
    contrastive_batch: Optional[int] = None
    grad_cache_chunk: Optional[int] = None
    # Per-block switches, applied to the encoder before the engine wraps it (AC -> compile -> shard).
    activation_checkpointing: str = "none"  # none | full | every_<k> | block indices, e.g. "0,2,5"
    compile: bool = False  # torch.compile each encoder block (on CPU needs a C++ compiler)


@dataclass
class EngineConfig:
    name: str = "auto"  # auto (single process, or ddp under a launcher) | single | ddp | fsdp | deepspeed
    backend: str = "auto"  # process-group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: float = 1800.0  # collective timeout before a hung rank fails the job
    find_unused_parameters: bool = False  # ddp (turned on automatically under gradient caching)
    fsdp_reshard_after_forward: bool = True  # fsdp: free each block's gathered params after its forward
    deepspeed_config: str = ""  # DeepSpeed JSON; "" -> recipes/deepspeed/zero{zero_stage}.json
    zero_stage: Optional[int] = None  # overrides the JSON's zero_optimization.stage (1, 2 or 3)
    sync_timing: bool = True  # CUDA: synchronise around timed communication / optimizer step


@dataclass
class EvalConfig:
    """The kNN monitor run during pre-training (scale/eval/knn.py); standalone evals reuse it."""
    knn_every_epochs: int = 0  # 0: off; else every N epochs, on data.root (bank) vs data.val_root (queries)
    knn_k: int = 20  # DINO's weighted k-NN: k = 20, temperature 0.07
    knn_temperature: float = 0.07
    max_train_samples: int = 0  # 0: the whole bank split; else a (shuffled) subset of this size
    max_val_samples: int = 0  # 0: the whole held-out split
    batch_size: int = 256  # images per encoder forward during feature extraction


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- coercion

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin in (tuple, list, Tuple, List):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list for {_type_name(tp)}, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
        item_types = [args[0]] * len(value) if (not args or args[-1] is Ellipsis or origin is list) else list(args)
        items = [_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)  # accepts "inf", "1e-4" and YAML's .inf
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if math.isnan(out):
            raise ConfigError(f"{key}: NaN is not allowed")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _merge(obj: Any, data: Dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    allowed = [f.name for f in dataclasses.fields(obj)]
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in allowed:
            raise ConfigError(f"unknown config key {key!r}; allowed under "
                              f"{prefix.rstrip('.') or 'the top level'}: {', '.join(allowed)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def _set_dotted(cfg: Any, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    data: Dict[str, Any] = {}
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    value: Any = yaml.safe_load(raw) if raw != "" else ""
    node[parts[-1]] = value
    _merge(cfg, data)


def merge_recipe(cfg: Any, path: str | Path) -> None:
    """Merge a YAML recipe file into the dataclass `cfg` (unknown keys and bad types raise)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist")
    with open(path) as f:
        _merge(cfg, yaml.safe_load(f) or {})


def apply_overrides(cfg: Any, overrides: Sequence[str], example: str = "optim.blr=1e-4") -> None:
    """Apply dotted `key=value` overrides to the dataclass `cfg`."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. {example})")
        key, raw = item.split("=", 1)
        _set_dotted(cfg, key.strip(), raw)


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                base: Optional[Dict[str, Any]] = None) -> RunConfig:
    """Build a RunConfig from defaults, a saved config dict (`base`, e.g. a checkpoint's),
    an optional YAML recipe, then `key=value` overrides; validated before it is returned."""
    cfg = RunConfig()
    if base:
        _merge(cfg, base)
    if path is not None:
        merge_recipe(cfg, path)
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Value checks that types alone cannot express."""
    def require(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    require(0.0 <= cfg.mask.ratio < 1.0, f"mask.ratio must be in [0, 1), got {cfg.mask.ratio}")
    require(cfg.objective.kappa > 0, f"objective.kappa must be > 0 (or .inf), got {cfg.objective.kappa}")
    o = cfg.objective
    require(0 < o.min_temperature <= o.init_temperature <= o.max_temperature,
            "objective temperatures must satisfy 0 < min_temperature <= init_temperature <= max_temperature, "
            f"got {o.min_temperature}, {o.init_temperature}, {o.max_temperature}")
    require(o.head.layers in (0, 2, 3), f"objective.head.layers must be 0, 2 or 3, got {o.head.layers}")
    require(cfg.model.attn_backend in ("auto", "xformers", "sdpa", "math"),
            f"model.attn_backend must be one of auto, xformers, sdpa, math; got {cfg.model.attn_backend!r}")
    require(cfg.data.transform in ("mae", "none"),
            f"data.transform must be 'mae' or 'none', got {cfg.data.transform!r}")
    require(cfg.train.batch_size >= 2, f"train.batch_size must be >= 2 (negatives), got {cfg.train.batch_size}")
    require(cfg.train.epochs >= 1, f"train.epochs must be >= 1, got {cfg.train.epochs}")
    require(cfg.train.max_steps is None or cfg.train.max_steps >= 1,
            f"train.max_steps must be >= 1, got {cfg.train.max_steps}")
    require(cfg.train.device in ("auto", "cpu", "cuda"),
            f"train.device must be auto, cpu or cuda; got {cfg.train.device!r}")
    require(cfg.train.precision in ("auto", "bf16", "fp32"),
            f"train.precision must be auto, bf16 or fp32; got {cfg.train.precision!r}")
    require(cfg.train.log_every >= 1, f"train.log_every must be >= 1, got {cfg.train.log_every}")
    require(cfg.train.ckpt_every >= 1, f"train.ckpt_every must be >= 1, got {cfg.train.ckpt_every}")
    require(cfg.train.keep_last >= 1, f"train.keep_last must be >= 1, got {cfg.train.keep_last}")
    require(cfg.train.contrastive_batch is None or cfg.train.contrastive_batch >= 2,
            f"train.contrastive_batch must be >= 2 (negatives) or null, got {cfg.train.contrastive_batch}")
    require(cfg.train.grad_cache_chunk is None or cfg.train.grad_cache_chunk >= 1,
            f"train.grad_cache_chunk must be >= 1 or null, got {cfg.train.grad_cache_chunk}")
    ac = cfg.train.activation_checkpointing.strip()
    require(ac in ("none", "full") or (ac.startswith("every_") and ac[6:].isdigit() and int(ac[6:]) >= 1)
            or (ac.strip("[]") != "" and all(i.strip().isdigit() for i in ac.strip("[]").split(","))),
            f"train.activation_checkpointing must be none, full, every_<k> (k >= 1) or comma-separated "
            f"block indices such as 0,2,5; got {cfg.train.activation_checkpointing!r}")
    e = cfg.engine
    require(e.backend in ("auto", "nccl", "gloo"), f"engine.backend must be auto, nccl or gloo; got {e.backend!r}")
    require(e.timeout_s > 0, f"engine.timeout_s must be > 0, got {e.timeout_s}")
    require(e.zero_stage is None or e.zero_stage in (0, 1, 2, 3),
            f"engine.zero_stage must be 0, 1, 2, 3 or null, got {e.zero_stage}")
    require(cfg.optim.blr > 0 or (cfg.optim.lr or 0) > 0, "optim.blr (or optim.lr) must be > 0")
    require(cfg.optim.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {cfg.optim.warmup_epochs}")
    require(cfg.optim.clip_grad is None or cfg.optim.clip_grad > 0,
            f"optim.clip_grad must be > 0 or null, got {cfg.optim.clip_grad}")
    require(len(cfg.data.mean) == len(cfg.data.std),
            f"data.mean and data.std must have the same length, got {len(cfg.data.mean)} and {len(cfg.data.std)}")


def to_dict(cfg: Any) -> Dict[str, Any]:
    out = dataclasses.asdict(cfg)

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, float) and math.isinf(x):
            return float("inf")
        return x

    return plain(out)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
