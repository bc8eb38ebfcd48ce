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

from .errors import ConfigError
from .recipe_catalog import resolve_recipe


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch4_28"
    img_size: Optional[int] = None  # None: the preset's own size
    in_chans: Optional[int] = None  # None: the preset's own channel count
    train_patch_embed: bool = False  # paper: frozen; the public code trains it
    attn_backend: str = "auto"  # auto | xformers | sdpa | math
    drop_path_rate: float = 0.0
    init: str = "mocov3"  # mocov3 (OCL: q/k/v as separate Xavier matrices) | mae (plain Xavier, [CLS] N(0, .02))


@dataclass
class EHMConfig:
    """Evolved Hierarchical Masking (papers/evolved-hierarchical-masking.txt, METHODS.md): parts of a
    patch tree built from the current model's attention, cut at a depth that rises with training."""
    blocks: int = 6  # attention of the first k blocks (capped by depth), averaged over heads and blocks
    signal_batch: int = 64  # images per attention forward: fixed, so masks never depend on micro-batching
    similarity: str = "attention"  # attention: (A + A^T) / 2 (the paper) | attention_rows: cosine of attention rows
    tree: str = "rnn"  # rnn: reciprocal nearest neighbours, a few dozen rounds | greedy: one merge a round
    depth: str = "evolved"  # evolved: d = max(1, floor(progress x H)) | fixed: d = max(1, floor(fixed_depth x H))
    progress: str = "epoch"  # epoch: completed epochs / epochs (the paper) | step: step / total steps
    fixed_depth: float = 0.2  # depth=fixed, as a fraction of each tree's height H (0.2 shallow, 0.8 deep)
    max_depth: float = 1.0  # cap on d, as a fraction of H (two-group OCL: near the root only 2-5 parts remain)
    source: str = "online"  # online: the current model (the paper) | ema: an EMA of it (Evolved Part Masking)
    ema_decay: float = 0.999  # source=ema


@dataclass
class MaskConfig:
    name: str = "random_two_group"
    ratio: float = 0.3  # fraction of patches masked globally
    ehm: EHMConfig = field(default_factory=EHMConfig)  # ehm, ehm_two_group, ehm_drop_two_group


@dataclass
class HeadConfig:
    layers: int = 0  # 0: no head (paper default); 2 or 3: MoCo v3-style MLP head
    hidden_dim: int = 1024
    out_dim: int = 512


@dataclass
class DecoderConfig:
    """MAE's pixel decoder (MAE, ASL): a narrow ViT over all patch positions."""
    dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0


@dataclass
class ASLConfig:
    """ASL (papers/asl-arbitrary-scenarios.md): MAE plus a feature-augmented second branch whose pixel
    predictions are aligned with the original's, patch by patch."""
    branch: str = "aee"  # aee: one ViT block after the encoder | dle: embedding dropout, encoder run twice
    dle_dropout: float = 0.1  # DLE: dropout on the patch embeddings (the paper gives no value; reading 0.1)
    mae_weight: float = 1.0  # Eq. 11: L = mae_weight * L_MAE + align_weight * L_SEM, 1 : 1
    align_weight: float = 1.0
    mae_branches: str = "both"  # both: L_MAE is the mean of the two branches' MSE | original: first branch only
    align_loss: str = "l1"  # l1 (Eq. 9) | cosine (the ablation)
    align_cls: bool = False  # also align the decoder's [CLS] output (the ablation; off in the paper)


@dataclass
class ObjectiveConfig:
    name: str = "ocl"  # ocl | mae | asl
    # OCL
    kappa: float = 64.0  # T-SP concentration; .inf gives (1 + c) / 2
    init_temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5
    learn_temperature: bool = True
    head: HeadConfig = field(default_factory=HeadConfig)
    # MAE
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    norm_pix_loss: bool = True  # targets: each patch normalised by its mean and (unbiased) variance
    # ASL (MAE's decoder and norm_pix_loss above, plus)
    asl: ASLConfig = field(default_factory=ASLConfig)


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
    # Where JPEGs are decoded: cpu (DataLoader workers, at the smallest DCT scale the crop allows) | gpu
    # (webdataset only: nvJPEG on the device, crop + flip there; falls back to cpu, with a warning, where it cannot run)
    decode: str = "cpu"


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # lr = blr * effective_batch / 256
    lr: Optional[float] = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_epochs: float = 40.0
    clip_grad: Optional[float] = None
    # AdamW kernel: auto (fused on CUDA; torch's default per-parameter loop on CPU, where fused measured no
    # faster: docs/throughput.md) | fused | foreach | for_loop
    implementation: str = "auto"


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
    # The effective batch of one optimizer step, for every method: global_batch images over all ranks
    # (null: batch_size per rank), global_batch / world_size per rank (must divide evenly). micro_batch:
    # images one rank encodes per forward/backward pass; smaller than the per-rank batch, a coupled loss
    # (OCL's contrast) is gradient-cached and a per-image loss (MAE) accumulates gradients, both exactly.
    global_batch: Optional[int] = None
    micro_batch: Optional[int] = None
    # Resume refuses a config that changes shapes, format, data order or masks (scale/trainer/resume_check.py);
    # experts list here the keys that may differ anyway, e.g. [data.root, world_size].
    resume_allow_changes: List[str] = field(default_factory=list)
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


def _show(value: Any, limit: int = 80) -> str:
    """repr of a user's value, cut short: a hostile recipe must not make a page-long error."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
            value = parse_yaml(value, key) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list for {_type_name(tp)}, got {_show(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({_show(value)})")
        item_types = [args[0]] * len(value) if (not args or args[-1] is Ellipsis or origin is list) else list(args)
        items = [_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        try:
            out = float(value)  # accepts "inf", "1e-4" and YAML's .inf
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}") from None
        if math.isnan(out):
            raise ConfigError(f"{key}: NaN is not allowed")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


# Keys renamed since earlier releases: old recipes and checkpoints' saved configs still load.
RENAMED_KEYS = {"train.contrastive_batch": "train.global_batch", "train.grad_cache_chunk": "train.micro_batch"}


def _merge(obj: Any, data: Dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(type(obj))
    allowed = [f.name for f in dataclasses.fields(obj)]
    renamed = {old.rsplit(".", 1)[1]: new.rsplit(".", 1)[1] for old, new in RENAMED_KEYS.items()
               if old.rsplit(".", 1)[0] + "." == prefix}
    for old, new in renamed.items():
        if old in data and new in data:
            raise ConfigError(f"{prefix}{old} is the old name of {prefix}{new}; set only {prefix}{new}")
    data = {renamed.get(name, name): value for name, value in data.items()}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in allowed:
            raise ConfigError(f"unknown config key {_show(key)}; allowed under "
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
    value: Any = parse_yaml(raw, f"override {dotted}=...") if raw != "" else ""
    node[parts[-1]] = value
    _merge(cfg, data)


# Recipes are small: a bigger file, or one that expands to many nodes through YAML aliases
# ("billion laughs"), is refused before anything walks it.
MAX_RECIPE_BYTES = 1 << 20
MAX_OVERRIDE_CHARS = 1 << 16
MAX_YAML_NODES = 100_000


def _count_nodes(value: Any, budget: int) -> int:
    """Nodes of a loaded YAML value, aliases counted every time they are used; stops past `budget`."""
    stack, seen = [value], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > budget:
            return seen
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return seen


def parse_yaml(text: str, source: str) -> Any:
    """yaml.safe_load with the errors of a user's file: one line naming `source`."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{at}: {problem} (plain YAML only: no tags such as !!python)") \
            from None
    if _count_nodes(value, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ConfigError(f"{source}: more than {MAX_YAML_NODES} YAML nodes once aliases are expanded; "
                          "a recipe is a small mapping of keys to values")
    return value


def read_yaml_file(path: str | Path, what: str = "recipe") -> Any:
    """A user's YAML file, checked: exists, at most MAX_RECIPE_BYTES, UTF-8, plain YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist" if not path.exists()
                          else f"{what} {str(path)!r} is not a file")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise ConfigError(f"{what} {str(path)!r} is {size} bytes; recipes are at most {MAX_RECIPE_BYTES} bytes")
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (byte {err.start})") from None
    return parse_yaml(text, f"{what} {str(path)!r}")


def merge_recipe(cfg: Any, recipe: str | Path) -> None:
    """Merge a YAML recipe (a file, or a shipped recipe's name: scale.recipe_catalog) into the dataclass
    `cfg` (unknown keys and bad types raise). load_config and scale.eval's load_recipe read recipes here."""
    _merge(cfg, read_yaml_file(resolve_recipe(recipe)) or {})


def apply_overrides(cfg: Any, overrides: Sequence[str], example: str = "optim.blr=1e-4") -> None:
    """Apply dotted `key=value` overrides to the dataclass `cfg`."""
    for item in overrides:
        if len(item) > MAX_OVERRIDE_CHARS:
            raise ConfigError(f"override {item[:40]!r}... is {len(item)} characters; at most {MAX_OVERRIDE_CHARS}")
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. {example})")
        key, raw = item.split("=", 1)
        _set_dotted(cfg, key.strip(), raw)


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                base: Optional[Dict[str, Any]] = None) -> RunConfig:
    """Build a RunConfig from defaults, a saved config dict (`base`, e.g. a checkpoint's),
    an optional YAML recipe (a path or a recipe name), then `key=value` overrides; validated before
    it is returned."""
    cfg = RunConfig()
    if base:
        _merge(cfg, base)
    if path is not None:
        merge_recipe(cfg, path)
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def require_range(key: str, value: Optional[float], low: float = -math.inf, high: float = math.inf, *,
                  low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """`value` within [low, high] (`*_open`: the bound itself excluded), finite unless a bound is inf."""
    if value is None and optional:
        return
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if value is not None and lo_ok and hi_ok:
        return
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    raise ConfigError(f"{key} must be in {left}{low:g}, {high:g}{right}{' or null' if optional else ''}, got {value}")


def validate(cfg: RunConfig) -> None:
    """Value checks that types alone cannot express: every numeric key has its allowed range."""
    require = _require
    inf = math.inf
    m = cfg.model
    require_range("model.img_size", m.img_size, 1, optional=True)
    require_range("model.in_chans", m.in_chans, 1, optional=True)
    require_range("model.drop_path_rate", m.drop_path_rate, 0.0, 1.0, high_open=True)
    require(m.init in ("mocov3", "mae"), f"model.init must be mocov3 or mae; got {m.init!r}")
    require(m.attn_backend in ("auto", "xformers", "sdpa", "math"),
            f"model.attn_backend must be one of auto, xformers, sdpa, math; got {m.attn_backend!r}")
    require_range("mask.ratio", cfg.mask.ratio, 0.0, 1.0, high_open=True)
    e = cfg.mask.ehm
    require_range("mask.ehm.blocks", e.blocks, 1)
    require_range("mask.ehm.signal_batch", e.signal_batch, 1)
    require(e.tree in ("rnn", "greedy"), f"mask.ehm.tree must be rnn or greedy, got {e.tree!r}")
    require(e.similarity in ("attention", "attention_rows"),
            f"mask.ehm.similarity must be attention or attention_rows, got {e.similarity!r}")
    require(e.depth in ("evolved", "fixed"), f"mask.ehm.depth must be evolved or fixed, got {e.depth!r}")
    require(e.progress in ("epoch", "step"), f"mask.ehm.progress must be epoch or step, got {e.progress!r}")
    require_range("mask.ehm.fixed_depth", e.fixed_depth, 0.0, 1.0)
    require_range("mask.ehm.max_depth", e.max_depth, 0.0, 1.0, low_open=True)
    require(e.source in ("online", "ema"), f"mask.ehm.source must be online or ema, got {e.source!r}")
    require_range("mask.ehm.ema_decay", e.ema_decay, 0.0, 1.0, high_open=True)
    o = cfg.objective
    require(o.kappa > 0, f"objective.kappa must be > 0 (or .inf), got {o.kappa}")
    require(0 < o.min_temperature <= o.init_temperature <= o.max_temperature < inf,
            "objective temperatures must satisfy 0 < min_temperature <= init_temperature <= max_temperature < inf, "
            f"got {o.min_temperature}, {o.init_temperature}, {o.max_temperature}")
    require(o.head.layers in (0, 2, 3), f"objective.head.layers must be 0, 2 or 3, got {o.head.layers}")
    require_range("objective.head.hidden_dim", o.head.hidden_dim, 1)
    require_range("objective.head.out_dim", o.head.out_dim, 1)
    require_range("objective.decoder.dim", o.decoder.dim, 1)
    require_range("objective.decoder.depth", o.decoder.depth, 1)
    require_range("objective.decoder.num_heads", o.decoder.num_heads, 1)
    require(o.decoder.dim % o.decoder.num_heads == 0 and o.decoder.dim % 4 == 0,
            f"objective.decoder.dim must be divisible by 4 and by objective.decoder.num_heads, got "
            f"{o.decoder.dim} and {o.decoder.num_heads}")
    require_range("objective.decoder.mlp_ratio", o.decoder.mlp_ratio, 0.0, inf, low_open=True, high_open=True)
    require(o.asl.branch in ("aee", "dle"), f"objective.asl.branch must be aee or dle, got {o.asl.branch!r}")
    require(o.asl.mae_branches in ("both", "original"),
            f"objective.asl.mae_branches must be both or original, got {o.asl.mae_branches!r}")
    require(o.asl.align_loss in ("l1", "cosine"), f"objective.asl.align_loss must be l1 or cosine, got {o.asl.align_loss!r}")
    require_range("objective.asl.dle_dropout", o.asl.dle_dropout, 0.0, 1.0, high_open=True)
    require_range("objective.asl.mae_weight", o.asl.mae_weight, 0.0, 1000.0)
    require_range("objective.asl.align_weight", o.asl.align_weight, 0.0, 1000.0)
    # Both 0: the loss is 0 with zero gradients, and the run trains nothing without a word.
    require(o.name != "asl" or o.asl.mae_weight > 0 or o.asl.align_weight > 0,
            "objective.asl.mae_weight and objective.asl.align_weight must not both be 0 (the loss would be 0 and "
            "nothing would train); give at least one of them a value in (0, 1000]")
    # MAE and ASL score the pixels of the masked patches: with none masked the loss is 0 / 0 (NaN).
    require(o.name not in ("mae", "asl") or cfg.mask.ratio > 0,
            f"mask.ratio must be in (0, 1) for objective.name={o.name}, whose loss is computed on the masked "
            f"patches; got {cfg.mask.ratio}")
    d = cfg.data
    require(d.transform in ("mae", "none"), f"data.transform must be 'mae' or 'none', got {d.transform!r}")
    require(d.decode in ("cpu", "gpu"), f"data.decode must be cpu or gpu, got {d.decode!r}")
    require_range("data.num_samples", d.num_samples, 1)
    require_range("data.num_classes", d.num_classes, 1)
    require_range("data.num_workers", d.num_workers, 0, 512)
    require_range("data.shuffle_buffer", d.shuffle_buffer, 0)
    lo, hi = d.crop_scale
    require(0.0 < lo <= hi <= 1.0, f"data.crop_scale must be [min, max] with 0 < min <= max <= 1, got [{lo}, {hi}]")
    require(len(d.mean) == len(d.std),
            f"data.mean and data.std must have the same length, got {len(d.mean)} and {len(d.std)}")
    for i, (mean, std) in enumerate(zip(d.mean, d.std)):
        require(math.isfinite(mean), f"data.mean[{i}] must be finite, got {mean}")
        require(0.0 < std < inf, f"data.std[{i}] must be > 0 and finite, got {std}")
    p = cfg.optim
    require_range("optim.blr", p.blr, 0.0, inf, high_open=True)
    require_range("optim.lr", p.lr, 0.0, inf, low_open=True, high_open=True, optional=True)
    require(p.blr > 0 or p.lr is not None, "optim.blr (or optim.lr) must be > 0")
    require_range("optim.min_lr", p.min_lr, 0.0, inf, high_open=True)
    for i, beta in enumerate(p.betas):
        require_range(f"optim.betas[{i}]", beta, 0.0, 1.0, high_open=True)
    require_range("optim.weight_decay", p.weight_decay, 0.0, inf, high_open=True)
    require_range("optim.warmup_epochs", p.warmup_epochs, 0.0, inf, high_open=True)
    require(p.implementation in ("auto", "fused", "foreach", "for_loop"),
            f"optim.implementation must be auto, fused, foreach or for_loop; got {p.implementation!r}")
    require_range("optim.clip_grad", p.clip_grad, 0.0, inf, low_open=True, high_open=True, optional=True)
    t = cfg.train
    require_range("train.batch_size", t.batch_size, 1)
    require_range("train.epochs", t.epochs, 1)
    require_range("train.max_steps", t.max_steps, 1, optional=True)
    require_range("train.seed", t.seed, 0, 2**31 - 1)
    require(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda; got {t.device!r}")
    require(t.precision in ("auto", "bf16", "fp32"), f"train.precision must be auto, bf16 or fp32; got {t.precision!r}")
    require_range("train.log_every", t.log_every, 1)
    require_range("train.ckpt_every", t.ckpt_every, 1)
    require_range("train.keep_last", t.keep_last, 1)
    require_range("train.global_batch", t.global_batch, 1, optional=True)
    require_range("train.micro_batch", t.micro_batch, 1, optional=True)
    ac = t.activation_checkpointing.strip()
    require(ac in ("none", "full") or (ac.startswith("every_") and ac[6:].isdigit() and int(ac[6:]) >= 1)
            or (ac.strip("[]") != "" and all(i.strip().isdigit() for i in ac.strip("[]").split(","))),
            f"train.activation_checkpointing must be none, full, every_<k> (k >= 1) or comma-separated "
            f"block indices such as 0,2,5; got {t.activation_checkpointing!r}")
    known = set(_leaf_keys(RunConfig())) | {"world_size", "engine"}
    for key in t.resume_allow_changes:
        require(key in known or any(k.startswith(key + ".") for k in known),
                f"train.resume_allow_changes: {key!r} is not a config key (or section); allowed: dotted keys such "
                "as data.root or mask.ratio, a section such as model, world_size, engine")
    e = cfg.engine
    require(e.backend in ("auto", "nccl", "gloo"), f"engine.backend must be auto, nccl or gloo; got {e.backend!r}")
    require_range("engine.timeout_s", e.timeout_s, 0.0, inf, low_open=True, high_open=True)
    require(e.zero_stage is None or e.zero_stage in (0, 1, 2, 3),
            f"engine.zero_stage must be 0, 1, 2, 3 or null, got {e.zero_stage}")
    v = cfg.eval
    require_range("eval.knn_every_epochs", v.knn_every_epochs, 0)
    require_range("eval.knn_k", v.knn_k, 1)
    require_range("eval.knn_temperature", v.knn_temperature, 0.0, inf, low_open=True, high_open=True)
    require_range("eval.max_train_samples", v.max_train_samples, 0)
    require_range("eval.max_val_samples", v.max_val_samples, 0)
    require_range("eval.batch_size", v.batch_size, 1)


def _leaf_keys(obj: Any, prefix: str = "") -> List[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(_leaf_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


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
