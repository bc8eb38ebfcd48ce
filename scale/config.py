"""Typed run configuration: YAML recipes -> nested dataclasses, with dotted CLI overrides.

Every key is validated against the dataclass fields before any work starts; an unknown
key or a value of the wrong type raises ConfigError naming the key and what is allowed.

The run config holds what every run has (model, optimiser, schedule, batch, evaluation)
and four sections whose `name` picks a registered component: `objective`, `mask`,
`engine` and `data`. Each component declares its own config dataclass next to its code
and registers it with its builder (`OBJECTIVES.register("mae", config=MAEConfig)`); the
section of a run is that class plus the section's common fields, so a run carries and
checks only the settings of the components it uses. A key of another component (e.g.
`objective.kappa` on an MAE run) is an error naming the key and why, as is any key the
user set that has no effect under the resolved config.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Any, ClassVar, Dict, List, Literal, Optional, Sequence, Set, Tuple, Union

import yaml

from .errors import ConfigError
from .recipe_catalog import resolve_recipe

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch4_28"
    img_size: Optional[int] = None  # None: the preset's own size
    in_chans: Optional[int] = None  # None: the preset's own channel count
    train_patch_embed: bool = False  # paper: frozen; the public code trains it
    attn_backend: Literal["auto", "xformers", "sdpa", "math"] = "auto"
    drop_path_rate: float = 0.0
    # mocov3 (OCL: q/k/v as separate Xavier matrices) | mae (plain Xavier, [CLS] N(0, .02))
    init: Literal["mocov3", "mae"] = "mocov3"


# ----------------------------------------------------------------------------- component sections

@dataclass(frozen=True)
class Check:
    """What a component's `validate(check)` is handed: its section's key prefix, the keys the user set
    (a recipe or an override), and the run, for the few checks across sections (MAE: mask.ratio > 0)."""

    prefix: str  # e.g. "objective."
    run: "RunConfig"
    user_keys: AbstractSet[str] = frozenset()
    section: Any = None  # the section checked (e.g. cfg.objective): "has no effect" compares it with its defaults

    def require(self, ok: bool, message: str) -> None:
        _require(ok, message)

    def range(self, name: str, value: Optional[float], *args: Any, **kwargs: Any) -> None:
        """require_range on this section's key `name`."""
        require_range(self.prefix + name, value, *args, **kwargs)

    def was_set(self, name: str) -> bool:
        """Whether the user set this section's key `name` (or a key below it)."""
        key = self.prefix + name
        return any(k == key or k.startswith(key + ".") for k in self.user_keys)

    def unused(self, name: str, ignored: bool, why: str) -> None:
        """A key the user set to another value than its default that the resolved config ignores is an error:
        it would do nothing, silently. (Its default changes nothing, so a full dump such as --print-config's
        output, which sets every key, still loads.)"""
        if ignored and self.was_set(name) and not _is_default(self.section, name):
            raise ConfigError(f"{self.prefix}{name} has no effect: {why}")


def _plain(value: Any) -> Any:
    """A config value as YAML writes it: dataclasses as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _same(given: Any, default: Any) -> bool:
    """`given` (a user's value, maybe a partial mapping) says what `default` says."""
    given, default = _plain(given), _plain(default)
    if isinstance(given, dict) and isinstance(default, dict):
        return all(k in default and _same(v, default[k]) for k, v in given.items())
    return given == default


def _is_default(obj: Any, dotted: str) -> bool:
    """Whether the dataclass `obj` holds its class's default at the dotted key."""
    value, default = obj, type(obj)()
    for part in dotted.split("."):
        value, default = getattr(value, part), getattr(default, part)
    return _same(value, default)


class ComponentSection:
    """A config section whose `name` picks a registered component (objective, mask generator, engine,
    data source). `Section(name=...)` is an instance of the section's own fields combined with that
    component's config dataclass (`section_class`), so `cfg.objective.decoder` exists on an MAE run and
    `cfg.objective.kappa` does not. The component's `validate(check)` checks its own values."""

    registry: ClassVar[str] = ""  # "module:ATTRIBUTE" of the Registry naming the components
    component: ClassVar[Optional[str]] = None  # set on the combined classes only

    def __new__(cls, *args: Any, **kwargs: Any) -> "ComponentSection":
        if cls.component is None:  # the plain section: the class of the component `name` picks
            cls = section_class(cls, kwargs.get("name", cls.name))
        return super().__new__(cls)

    def __reduce__(self) -> Any:  # the combined class is made at run time: pickle by (section, values)
        return _rebuild_section, (section_base(type(self)), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def validate(self, check: Check) -> None:
        """Checks of the component's own values (a component config overrides it)."""

    def switched(self, name: str) -> "ComponentSection":
        """This section for the component `name`, keeping the values the two share."""
        new = section_class(section_base(type(self)), name)
        shared = {f.name for f in dataclasses.fields(new)} & {f.name for f in dataclasses.fields(self)}
        return new(**{key: getattr(self, key) for key in shared if key != "name"}, name=name)


def _rebuild_section(base: type, values: Dict[str, Any]) -> ComponentSection:
    return base(**values)


def section_base(cls: type) -> type:
    """The plain section class (e.g. MaskConfig) of a combined one."""
    return next(c for c in cls.__mro__ if ComponentSection in c.__bases__)


def section_registry(base: type) -> Any:
    module, attribute = base.registry.split(":")
    return getattr(importlib.import_module(module), attribute)


@functools.lru_cache(maxsize=None)
def section_class(base: type, name: str) -> type:
    """The dataclass of section `base` for the component `name`: the section's fields (name first), then
    the fields of the config the component registered. Unknown names raise naming the key."""
    config = section_registry(base).config_class(name)
    bases = (base,) if config is None else (config, base)
    namespace = {"component": name, "__module__": base.__module__, "__qualname__": f"{base.__name__}[{name}]"}
    return dataclass(type(f"{base.__name__}[{name}]", bases, namespace))


def component_fields(base: type) -> Dict[str, List[str]]:
    """Field name -> the components of section `base` whose config has it (for 'has no effect' errors)."""
    owners: Dict[str, List[str]] = {}
    registry = section_registry(base)
    for name in registry.names():
        config = registry.config_class(name)
        for f in dataclasses.fields(config) if config is not None else ():
            owners.setdefault(f.name, []).append(name)
    return owners


@dataclass
class MaskConfig(ComponentSection):
    registry: ClassVar[str] = "scale.masking:MASK_GENERATORS"
    name: str = "random_two_group"
    ratio: float = 0.3  # fraction of patches masked globally


@dataclass
class ObjectiveConfig(ComponentSection):
    registry: ClassVar[str] = "scale.objectives:OBJECTIVES"
    name: str = "ocl"  # ocl | mae | asl | any registered objective


@dataclass
class DataConfig(ComponentSection):
    """What every data source reads; a source's own keys are in its config (scale/data/*.py), and a
    source says which of these it ignores (a key set for it is then an error, not a silent no-op)."""
    registry: ClassVar[str] = "scale.data:DATASETS"
    name: str = "synthetic"  # synthetic | image_folder | webdataset | ...
    root: str = ""  # folder (image_folder) or shard URL pattern (webdataset)
    val_root: str = ""  # held-out split for monitors (webdataset: its shard pattern)
    num_samples: int = 8192  # synthetic size, or samples per epoch in resampled streams
    transform: Literal["mae", "none"] = "mae"
    crop_scale: Tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)
    num_workers: int = 2
    shuffle_buffer: int = 1000  # webdataset: in-worker sample shuffle buffer (0: off)
    # Where JPEGs are decoded: cpu (DataLoader workers, at the smallest DCT scale the crop allows) | gpu
    # (webdataset only: nvJPEG on the device, crop + flip there; falls back to cpu, with a warning, where it cannot run)
    decode: Literal["cpu", "gpu"] = "cpu"
    # Each rank writes the sample indices of every step to <output_dir>/samples/rank_<R>.jsonl, so that every
    # sample's use once per epoch can be checked from outside (scale/trainer/sample_record.py); needs a
    # source that names its samples (not a streaming webdataset).
    record_samples: bool = False


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # lr = blr * global_batch / 256
    lr: Optional[float] = None  # absolute lr; replaces blr when set
    min_lr: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_epochs: float = 40.0
    clip_grad: Optional[float] = None
    # AdamW kernel: auto (fused on CUDA; torch's default per-parameter loop on CPU, where fused measured no
    # faster: docs/throughput.md) | fused | foreach | for_loop
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"


# The per-device batch when neither train.global_batch nor train.micro_batch is set.
DEFAULT_MICRO_BATCH = 64
# train.micro_batch: auto: the largest micro-batch the device's free memory holds (scale/engine/memory_plan.py).
AUTO_MICRO_BATCH = "auto"
MIN_HANG_TIMEOUT_S = 1.0


@dataclass
class TrainConfig:
    epochs: int = 800
    # One batch vocabulary for every method and engine. global_batch: the images of one optimizer step over
    # all devices (what the optimiser sees; split evenly, global_batch / devices each). micro_batch: the
    # images one device passes through the model at once; below its share of global_batch, a coupled loss
    # (OCL's contrast) is gradient-cached and a per-image loss (MAE) accumulates gradients, both exactly.
    # global_batch null: each device passes micro_batch (default 64) per step, global = micro_batch x devices.
    # micro_batch null: each device passes its whole share at once. micro_batch auto (needs global_batch): the
    # largest that fits the GPU's free memory by the step's memory estimate, logged; one pass on a CPU.
    global_batch: Optional[int] = None
    micro_batch: Optional[Union[int, Literal["auto"]]] = None
    max_steps: Optional[int] = None  # stop early (the schedule still spans all epochs)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    output_dir: str = "runs/default"
    resume: str = ""  # "" (fresh) | auto | path to a checkpoint
    # Resume refuses a config that changes shapes, format, data order or masks (scale/trainer/resume_check.py);
    # experts list here the keys that may differ anyway, e.g. [data.root, world_size].
    resume_allow_changes: List[str] = field(default_factory=list)
    # Per-block switches, applied to the encoder before the engine wraps it (AC -> compile -> shard).
    activation_checkpointing: str = "none"  # none | full | every_<k> | block indices, e.g. "0,2,5"
    compile: bool = False  # torch.compile each encoder block (on CPU needs a C++ compiler)
    # A rank on which no step completes for this long writes its threads' stacks to <output_dir>/hang/ and
    # exits 4 (scale/trainer/watchdog.py). null: sized from the measured step time, at least 5 minutes;
    # set: at least MIN_HANG_TIMEOUT_S.
    hang_timeout_s: Optional[float] = None
    # A non-finite loss or grad norm (checked at log steps and before every checkpoint): stop (exit 5), or
    # rollback: reload the last good checkpoint and skip the diverged batches, at most max_rollbacks times.
    on_nonfinite: Literal["stop", "rollback"] = "stop"
    max_rollbacks: int = 3


@dataclass
class EngineConfig(ComponentSection):
    """What every engine reads; an engine's own keys are in its config (scale/engine/*.py)."""
    registry: ClassVar[str] = "scale.engine:ENGINES"
    name: str = "auto"  # auto (single process, or ddp / fsdp / deepspeed by the launcher) | single | ddp | fsdp | deepspeed
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # process-group backend: auto (nccl on CUDA, gloo on CPU)
    timeout_s: float = 1800.0  # collective timeout before a hung rank fails the job
    sync_timing: bool = True  # CUDA: synchronise around timed communication / optimizer step


@dataclass
class EvalConfig:
    """The kNN monitor run during pre-training (scale/eval/knn.py); standalone evals reuse it."""
    knn_every_epochs: int = 0  # 0: off; else every N epochs, on data.root (bank) vs data.val_root (queries)
    knn_k: int = 20  # DINO's weighted k-NN: k = 20, temperature 0.07
    knn_temperature: float = 0.07
    max_train_samples: int = 0  # 0: the whole bank split; else a (shuffled) subset of this size
    max_val_samples: int = 0  # 0: the whole held-out split
    micro_batch: int = 256  # images per encoder forward during feature extraction


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
    if origin is typing.Union:  # Optional[X], or one of several types (train.micro_batch: an integer or auto)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        for alternative in inner:
            try:
                return _coerce(value, alternative, key)
            except ConfigError:
                continue
        names = [" or ".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal else
                 "an integer" if a is int else _type_name(a) for a in inner]
        names += ["null"] if type(None) in args else []
        raise ConfigError(f"{key}: expected {', '.join(names[:-1])} or {names[-1]}; got {_show(value)}")
    if origin is Literal:  # a choice: the one allowed value that `value` reads as
        for choice in args:
            try:
                if _coerce(value, type(choice), key) == choice:
                    return choice
            except ConfigError:
                continue
        names = [str(choice) for choice in args]
        allowed = f"{names[0]} or {names[1]}" if len(names) == 2 else "one of " + ", ".join(names)
        raise ConfigError(f"{key} must be {allowed}; got {_show(value)}")
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


# Keys renamed since earlier releases: old recipes and checkpoints' saved configs still load (a recipe's or an
# override's with a one-line note). The batch keys of the evaluation recipes (scale/eval/config.py) meant the
# optimiser's batch and one forward's, as global_batch and micro_batch do everywhere now.
RENAMED_KEYS = {"train.contrastive_batch": "train.global_batch", "train.grad_cache_chunk": "train.micro_batch",
                "eval.batch_size": "eval.micro_batch", "probe.batch_size": "probe.global_batch",
                "probe.encode_chunk": "probe.micro_batch", "finetune.batch_size": "finetune.global_batch"}
# Before the one batch vocabulary, train.batch_size was the images per device per step (ignored when
# train.global_batch was set). scale/trainer/resume_check.py maps saved configs with `saved_batch_keys`.
OLD_DEVICE_BATCH = "batch_size"


def saved_batch_keys(train: Dict[str, Any], world_size: int = 1) -> Dict[str, Any]:
    """A `train` section saved by a release with train.batch_size, in today's keys, meaning the same
    steps on `world_size` devices: batch_size B is micro_batch B, or with a smaller micro_batch the
    global_batch B x world_size; with global_batch set it did nothing and is dropped."""
    train = dict(train)
    batch = train.pop(OLD_DEVICE_BATCH, None)
    if batch is None or train.get("global_batch") is not None:
        return train
    micro = train.get("micro_batch")
    if micro is None or (isinstance(micro, int) and isinstance(batch, int) and micro >= batch):
        train["micro_batch"] = batch
    else:
        train["global_batch"] = batch * world_size if isinstance(batch, int) else batch
    return train


def _device_batch(data: Dict[str, Any], user_keys: Optional[Set[str]]) -> Dict[str, Any]:
    """`train` keys with the old train.batch_size in today's vocabulary (see saved_batch_keys)."""
    if OLD_DEVICE_BATCH not in data:
        return data
    if user_keys is None:
        return saved_batch_keys(data)
    batch = data[OLD_DEVICE_BATCH]
    if "global_batch" in data or "micro_batch" in data:  # an old dump (--print-config, a recipe) of the whole section
        upgraded = saved_batch_keys(data)
        log.warning("note: train.batch_size=%s (the old per-device batch) is read as %s", _show(batch),
                    ", ".join(f"train.{k}={upgraded.get(k)}" for k in ("global_batch", "micro_batch")))
        return upgraded
    if "train.global_batch" in user_keys:
        raise ConfigError(
            f"train.batch_size={_show(batch)} has no effect: train.global_batch is set (the images of one optimizer "
            f"step over all devices); to change the images one device passes at once, set train.micro_batch")
    log.warning("note: train.batch_size is now train.micro_batch (the images one device passes at once; with "
                "train.global_batch unset the optimiser sees micro_batch x devices)")
    return {("micro_batch" if name == OLD_DEVICE_BATCH else name): value for name, value in data.items()}


def _leaves(value: Any, key: str) -> List[str]:
    """The dotted leaf keys of a user's `value` at `key` (for an error that names them)."""
    if isinstance(value, dict) and value:
        return [leaf for name, inner in value.items() for leaf in _leaves(inner, f"{key}.{name}")]
    return [key]


def _merge(obj: Any, data: Dict[str, Any], prefix: str = "", user_keys: Optional[Set[str]] = None) -> Any:
    """Merge `data` into the dataclass `obj`; return it (a section whose `name` changes is a new object).
    `user_keys` collects the keys set (a recipe, overrides); None: `data` is a saved config (a checkpoint's),
    written by releases that saved every component's keys, whose keys of unused components are dropped."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_show(data)}")
    renamed = {old.rsplit(".", 1)[1]: new.rsplit(".", 1)[1] for old, new in RENAMED_KEYS.items()
               if old.rsplit(".", 1)[0] + "." == prefix}
    for old, new in renamed.items():
        if old in data and new in data:
            raise ConfigError(f"{prefix}{old} is the old name of {prefix}{new}; set only {prefix}{new}")
    if user_keys is not None:
        for old in sorted(set(renamed) & set(data)):
            log.warning("note: %s%s is now %s%s", prefix, old, prefix, renamed[old])
    data = {renamed.get(name, name): value for name, value in data.items()}
    if prefix == "train.":
        data = _device_batch(data, user_keys)
    if isinstance(obj, ComponentSection) and "name" in data:  # the name first: it decides the other keys
        obj = _rename_section(obj, _coerce(data["name"], str, f"{prefix}name"), prefix, user_keys)
    hints = typing.get_type_hints(type(obj))
    allowed = [f.name for f in dataclasses.fields(obj)]
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in allowed:
            _not_a_field(obj, key, name, value, prefix, allowed, user_keys)
            continue
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            setattr(obj, name, _merge(current, value, key + ".", user_keys))
        else:
            setattr(obj, name, _coerce(value, hints[name], key))
            if user_keys is not None:
                user_keys.add(key)
    return obj


def _rename_section(section: ComponentSection, name: str, prefix: str,
                    user_keys: Optional[Set[str]]) -> ComponentSection:
    """`section` for the component `name`; a key the user set for the previous component that the new
    one lacks is refused (it would do nothing)."""
    if user_keys is not None:
        user_keys.add(f"{prefix}name")
    if name == section.name:
        return section
    new = section.switched(name)  # an unknown name raises, naming the key and the registered names
    kept = {f.name for f in dataclasses.fields(new)}
    for key in sorted(user_keys or ()):
        if key.startswith(prefix) and key[len(prefix):].split(".")[0] not in kept \
                and not _is_default(section, key[len(prefix):]):
            raise ConfigError(f"{key} has no effect: {prefix}name is {name} ({key} is a setting of "
                              f"{section_registry(section_base(type(section))).kind} {section.name})")
    return new


def _not_a_field(obj: Any, key: str, name: str, value: Any, prefix: str, allowed: List[str],
                 user_keys: Optional[Set[str]]) -> None:
    """A key `obj` lacks: another component's key (dropped from a saved config, else refused), or unknown."""
    owners = component_fields(section_base(type(obj))).get(name, []) if isinstance(obj, ComponentSection) else []
    if not owners:
        raise ConfigError(f"unknown config key {_show(key)}; allowed under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(allowed)}")
    registry = section_registry(section_base(type(obj)))
    owner_default = dataclasses.asdict(registry.config_class(owners[0])()).get(name)
    if user_keys is not None and not _same(value, owner_default):  # its default changes nothing: dropped
        kind = registry.kind
        raise ConfigError(f"{_leaves(value, key)[0]} has no effect: {prefix}name is {obj.name} ({key} is a setting "
                          f"of {kind} {', '.join(owners)}; set {prefix}name first)")


def _set_dotted(cfg: Any, dotted: str, raw: str, user_keys: Optional[Set[str]] = None) -> Any:
    parts = dotted.split(".")
    data: Dict[str, Any] = {}
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    value: Any = parse_yaml(raw, f"override {dotted}=...") if raw != "" else ""
    node[parts[-1]] = value
    return _merge(cfg, data, "", set() if user_keys is None else user_keys)



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


def merge_recipe(cfg: Any, recipe: str | Path, user_keys: Optional[Set[str]] = None) -> None:
    """Merge a YAML recipe (a file, or a shipped recipe's name: scale.recipe_catalog) into the dataclass
    `cfg` (unknown keys and bad types raise). load_config and scale.eval's load_recipe read recipes here."""
    _merge(cfg, read_yaml_file(resolve_recipe(recipe)) or {}, "", set() if user_keys is None else user_keys)


def apply_overrides(cfg: Any, overrides: Sequence[str], example: str = "optim.blr=1e-4",
                    user_keys: Optional[Set[str]] = None) -> None:
    """Apply dotted `key=value` overrides to the dataclass `cfg`."""
    user_keys = set() if user_keys is None else user_keys
    for item in overrides:
        if len(item) > MAX_OVERRIDE_CHARS:
            raise ConfigError(f"override {item[:40]!r}... is {len(item)} characters; at most {MAX_OVERRIDE_CHARS}")
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. {example})")
        key, raw = item.split("=", 1)
        _set_dotted(cfg, key.strip(), raw, user_keys)


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                base: Optional[Dict[str, Any]] = None) -> RunConfig:
    """Build a RunConfig from defaults, a saved config dict (`base`, e.g. a checkpoint's),
    an optional YAML recipe (a path or a recipe name), then `key=value` overrides; validated before
    it is returned (a key the recipe or an override sets that has no effect is an error)."""
    cfg = RunConfig()
    if base:
        _merge(cfg, base)
    user_keys: Set[str] = set()
    if path is not None:
        merge_recipe(cfg, path, user_keys)
    apply_overrides(cfg, overrides, user_keys=user_keys)
    validate(cfg, user_keys)
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


def validate(cfg: RunConfig, user_keys: AbstractSet[str] = frozenset()) -> None:
    """Value checks that types alone cannot express: every numeric key has its allowed range, and a key in
    `user_keys` (set by a recipe or an override) that the resolved config ignores is an error. Each
    component section checks its own values (`validate(check)` next to its code)."""
    require = _require
    inf = math.inf
    m = cfg.model
    require_range("model.img_size", m.img_size, 1, optional=True)
    require_range("model.in_chans", m.in_chans, 1, optional=True)
    require_range("model.drop_path_rate", m.drop_path_rate, 0.0, 1.0, high_open=True)
    require_range("mask.ratio", cfg.mask.ratio, 0.0, 1.0, high_open=True)
    d = cfg.data
    require_range("data.num_samples", d.num_samples, 1)
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
    Check("optim.", cfg, user_keys, p).unused("blr", p.lr is not None, "optim.lr is set (it replaces blr x batch / 256)")
    require_range("optim.min_lr", p.min_lr, 0.0, inf, high_open=True)
    for i, beta in enumerate(p.betas):
        require_range(f"optim.betas[{i}]", beta, 0.0, 1.0, high_open=True)
    require_range("optim.weight_decay", p.weight_decay, 0.0, inf, high_open=True)
    require_range("optim.warmup_epochs", p.warmup_epochs, 0.0, inf, high_open=True)
    require_range("optim.clip_grad", p.clip_grad, 0.0, inf, low_open=True, high_open=True, optional=True)
    t = cfg.train
    require_range("train.epochs", t.epochs, 1)
    require_range("train.max_steps", t.max_steps, 1, optional=True)
    require_range("train.seed", t.seed, 0, 2**31 - 1)
    require_range("train.log_every", t.log_every, 1)
    require_range("train.ckpt_every", t.ckpt_every, 1)
    require_range("train.keep_last", t.keep_last, 1)
    require_range("train.global_batch", t.global_batch, 1, optional=True)
    if t.micro_batch == AUTO_MICRO_BATCH:  # the optimiser's batch must not depend on the device's memory
        require(t.global_batch is not None, "train.micro_batch=auto needs train.global_batch (the images of one "
                "optimizer step); auto only chooses how many of them pass at once")
    else:
        require_range("train.micro_batch", t.micro_batch, 1, optional=True)
    # At least a second: a value in milliseconds by mistake would end healthy runs with the hang exit, which
    # the SLURM launcher requeues (a requeue loop instead of a config error).
    require_range("train.hang_timeout_s", t.hang_timeout_s, MIN_HANG_TIMEOUT_S, inf, high_open=True, optional=True)
    require_range("train.max_rollbacks", t.max_rollbacks, 0)
    Check("train.", cfg, user_keys, t).unused("max_rollbacks", t.on_nonfinite == "stop",
                                              "train.on_nonfinite is stop (rollback reads it)")
    ac = t.activation_checkpointing.strip()
    require(ac in ("none", "full") or (ac.startswith("every_") and ac[6:].isdigit() and int(ac[6:]) >= 1)
            or (ac.strip("[]") != "" and all(i.strip().isdigit() for i in ac.strip("[]").split(","))),
            f"train.activation_checkpointing must be none, full, every_<k> (k >= 1) or comma-separated "
            f"block indices such as 0,2,5; got {t.activation_checkpointing!r}")
    known = set(_leaf_keys(cfg)) | {"world_size", "engine"}
    for key in t.resume_allow_changes:
        require(key in known or any(k.startswith(key + ".") for k in known),
                f"train.resume_allow_changes: {key!r} is not a config key (or section) of this run; allowed: dotted "
                "keys such as data.root or mask.ratio, a section such as model, world_size, engine")
    require_range("engine.timeout_s", cfg.engine.timeout_s, 0.0, inf, low_open=True, high_open=True)
    # The hang watchdog must end a hung rank's job before its peers' collectives time out (no stacks, no requeue).
    require(t.hang_timeout_s is None or t.hang_timeout_s < cfg.engine.timeout_s,
            f"train.hang_timeout_s ({t.hang_timeout_s}) must be below engine.timeout_s ({cfg.engine.timeout_s}), "
            "so that the watchdog fires before the collectives time out; lower it, or raise engine.timeout_s")
    v = cfg.eval
    require_range("eval.knn_every_epochs", v.knn_every_epochs, 0)
    require_range("eval.knn_k", v.knn_k, 1)
    require_range("eval.knn_temperature", v.knn_temperature, 0.0, inf, low_open=True, high_open=True)
    require_range("eval.max_train_samples", v.max_train_samples, 0)
    require_range("eval.max_val_samples", v.max_val_samples, 0)
    require_range("eval.micro_batch", v.micro_batch, 1)
    sections: Tuple[Tuple[str, ComponentSection], ...] = (
        ("objective", cfg.objective), ("mask", cfg.mask), ("engine", cfg.engine), ("data", cfg.data))
    for prefix, section in sections:
        section.validate(Check(f"{prefix}.", cfg, user_keys, section))


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
