"""Which config changes a resume accepts.

A checkpoint stores the config of the run that wrote it. Resuming under another config
either cannot load (parameter shapes, checkpoint format) or silently continues a
different run (data order, masks). Before any work, the new config is compared key by
key with the checkpoint's:

- refused: keys that change parameter shapes or the checkpoint format, and keys that
  change the data order, the images or the masks; one error lists each as `old -> new`;
- allowed with a warning: the schedule and optimizer hyper-parameters (epochs, lr,
  warm-up, `max_steps`, ...), which users change on purpose to extend or shorten a run;
- allowed silently: everything else (logging, output, kernels, activation checkpointing,
  timeouts, monitors), which does not change what a step computes.

The data order is the source's (`PretrainData.order`), recorded in meta.json as `data_order`;
which order a WebDataset split gets depends on whether its shards have an index, so adding or
losing one between two allocations changes it. Mid-epoch, the rest of the epoch must be drawn in
the checkpoint's order, so another one is refused unless the checkpoint sits at an epoch's end
(the next epoch is drawn whole in this run's order). A meta.json without `data_order` was
written before the order and masks stopped depending on the rank: on one rank that is today's
order (map-style) or a stream (webdataset); on several, an order no source draws any more, so
such a checkpoint resumes only at an epoch's end.

The world size (and `data.num_workers`) may change where the data order does not depend on
them (map-style sources and indexed shards; global batch k is the same samples on any number
of ranks), judged by the order the rest of the epoch is drawn in: the checkpoint's mid-epoch (a
stream checkpoint stays a stream for the rest of its epoch, even if the shards were indexed
since), this run's at an epoch's end. The global batch stays what it was: with
`train.global_batch` set, each rank's batch and gradient-caching chunks are re-derived by
`plan_batch`; with it null (global = micro-batch x ranks) the change is refused, naming the
value that keeps the checkpoint's global batch. Streaming WebDataset readers deal shards to
world_size x num_workers readers, so there both stay refused.

`train.resume_allow_changes` is the expert escape hatch: the keys it names may differ.
Nothing in the checkpoint switches the check off: a meta.json without the config, the
engine family or the world size it was written with is refused (`resume_meta`).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..checkpoint_io.directory import CONFIG_KEY, DATA_ORDER_KEY, META, CheckpointError
from ..config import DEFAULT_MICRO_BATCH, RENAMED_KEYS, RunConfig, saved_batch_keys, to_dict
from ..data.base import ELASTIC_ORDERS, GLOBAL_BATCH_SLICES, INDEXED_SHARD_WINDOWS, STREAM

# Prefixes (a section, or one key) whose change is refused, with the reason shown.
REFUSED: Tuple[Tuple[str, str], ...] = (
    ("model.name", "parameter shapes"),
    ("model.img_size", "parameter shapes"),
    ("model.in_chans", "parameter shapes"),
    ("model.train_patch_embed", "the optimizer's parameters"),
    ("objective.name", "parameter shapes"),
    ("objective.head", "parameter shapes"),
    ("objective.decoder", "parameter shapes"),
    ("objective.learn_temperature", "the optimizer's parameters"),
    ("mask", "the masks"),
    ("train.seed", "the data order and the masks"),
    ("train.global_batch", "the data order"),
    ("data.name", "the data"),
    ("data.root", "the data"),
    ("data.num_samples", "the data order"),
    ("data.resampled", "the data order"),
    ("data.manifest", "the data"),
    ("data.shuffle_buffer", "the data order"),
    ("data.num_classes", "the data"),
    ("data.transform", "the images"),
    ("data.crop_scale", "the images"),
    ("data.hflip", "the images"),
    ("data.mean", "the images"),
    ("data.std", "the images"),
    ("engine.zero_stage", "the checkpoint format"),
    ("engine.deepspeed_config", "the checkpoint format"),
)
# Changed on purpose to extend, shorten or re-tune a run: logged, not refused.
WARNED: Tuple[str, ...] = ("train.epochs", "train.max_steps", "train.precision", "optim", "model.drop_path_rate",
                           "objective.kappa", "objective.min_temperature", "objective.max_temperature",
                           "objective.init_temperature", "objective.norm_pix_loss",
                           "data.decode")  # same crops and flips; the decoders round pixels differently
# Keys that are not config keys but are checked the same way.
WORLD_SIZE = "world_size"
ENGINE_FAMILY = "engine"
# The order of a multi-rank checkpoint written before data_order was recorded: each rank strode through
# the permutation and drew its own masks, so its epoch cannot be continued in any order drawn today.
RANK_STRIDES = "per-rank strides (written before data_order was recorded)"
# What meta.json must record for a resume to be checked (read_meta has checked their types).
RESUME_META_KEYS = (CONFIG_KEY, "checkpoint_format", WORLD_SIZE)


def resume_meta(meta: Dict[str, Any], checkpoint: str) -> Dict[str, Any]:
    """`meta` when it records what check_resume_config compares; else a CheckpointError: a resume
    that cannot be checked is refused, never let through with a warning."""
    missing = [key for key in RESUME_META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(
            f"cannot resume {checkpoint}: its {META} does not record {', '.join(repr(k) for k in missing)}, so the "
            "config of this run cannot be checked against the checkpoint's; restore the checkpoint's own "
            f"{META}, or start a new run in another train.output_dir")
    return meta


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _matches(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new))
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return float(old) == float(new)
    return old == new


def config_changes(old: Dict[str, Any], new: Dict[str, Any], old_world_size: int = 1) -> List[Tuple[str, Any, Any]]:
    """(key, old, new) for every leaf key whose value differs, both sides carrying it. `old` may come
    from an earlier release: renamed keys, train.batch_size (on `old_world_size` ranks) and the keys of
    components the run does not use (saved then with every section) are read as today's."""
    if isinstance(old.get("train"), dict):
        old = {**old, "train": saved_batch_keys(old["train"], old_world_size)}
    old_flat = {RENAMED_KEYS.get(key, key): value for key, value in _flatten(old)}  # configs saved before a rename
    new_flat = dict(_flatten(new))
    changes = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if key not in old_flat or key not in new_flat:  # newer than the checkpoint, or a component not used
            continue
        if not _same(old_flat.get(key), new_flat.get(key)):
            changes.append((key, old_flat.get(key), new_flat.get(key)))
    return changes


def saved_global_batch(saved_train: Dict[str, Any], world_size: int) -> Any:
    """The images of one optimizer step of the run that wrote a checkpoint: its train.global_batch, or
    (null) its per-rank train.micro_batch x the `world_size` it ran on (read as today's keys)."""
    train = saved_batch_keys(saved_train, world_size)
    if train.get("global_batch") is not None:
        return train["global_batch"]
    micro = train.get("micro_batch")
    micro = DEFAULT_MICRO_BATCH if micro is None else micro
    return micro * world_size if isinstance(micro, int) else None


def saved_order(saved_meta: Dict[str, Any], saved: Dict[str, Any], old_world: int) -> str:
    """The order the checkpoint's epoch was drawn in: its data_order, else (written before it was recorded)
    RANK_STRIDES on several ranks, and on one the stream or today's map-style order, which it equals."""
    if isinstance(saved_meta.get(DATA_ORDER_KEY), str):
        return saved_meta[DATA_ORDER_KEY]
    if old_world > 1:
        return RANK_STRIDES
    data = saved.get("data")
    return STREAM if isinstance(data, dict) and data.get("name") == "webdataset" else GLOBAL_BATCH_SLICES


def _order_reason(old: str, new: str, step: Any, steps_per_epoch: Optional[int]) -> str:
    """Why continuing the checkpoint's epoch in another order is refused, and how to resume instead."""
    if steps_per_epoch:
        epoch = step // steps_per_epoch
        where = (f"step {step} is in the middle of epoch {epoch}; resume the checkpoint at an epoch's end "
                 f"(step {epoch * steps_per_epoch} or {(epoch + 1) * steps_per_epoch})")
    else:
        where = f"step {step} may be mid-epoch; resume a checkpoint at an epoch's end"
    if old == STREAM and new == INDEXED_SHARD_WINDOWS:
        where += ", or move the shards' NAME.tar.idx.json indexes aside until that epoch ends (read as a stream again)"
    elif old == INDEXED_SHARD_WINDOWS and new == STREAM:
        where += (", or rebuild the shards' indexes (scale-verify-shards --index) so they are read by index "
                  "again")
    elif old == RANK_STRIDES:
        where += ", which the release that wrote it can reach"
    return f"the order of the rest of the epoch, which would skip and repeat samples: {where}"


def _world_size_reason(cfg: RunConfig, order: str, old_global: Any) -> Any:
    """Why resuming on another number of ranks is refused (None: it is not); `order`: the one the rest of
    the epoch is drawn in. Every engine's checkpoint loads on another world size: torch files (single,
    DDP) hold whole tensors, DCP (FSDP2) reshards on load, and DeepSpeed's ZeRO partitions are gathered
    whole and partitioned anew (checkpoint_io/deepspeed.py)."""
    if order not in ELASTIC_ORDERS:
        return (f"the data order: the epoch is drawn in order {order!r}, which depends on the world size and "
                "data.num_workers; map-style sources (synthetic, imagefolder) and indexed shards resume on "
                "another world size")
    if cfg.train.global_batch is None:
        return (f"the global batch: train.global_batch is null, so it is micro_batch x ranks; set "
                f"train.global_batch={old_global} to keep the checkpoint's")
    return None


def check_resume_config(saved: Dict[str, Any], cfg: RunConfig, saved_meta: Dict[str, Any], checkpoint_format: str,
                        world_size: int, checkpoint: str, data_order: str = GLOBAL_BATCH_SLICES,
                        steps_per_epoch: Optional[int] = None) -> List[str]:
    """Raise CheckpointError listing refused changes; return warnings for allowed ones. `data_order`: this
    run's PretrainData.order; `steps_per_epoch`: this run's, to tell whether the checkpoint's step is at an
    epoch's end (None: unknown, taken as mid-epoch)."""
    allowed = set(cfg.train.resume_allow_changes)
    old_world = int(saved_meta.get(WORLD_SIZE) or 1)
    old_order = saved_order(saved_meta, saved, old_world)
    step = saved_meta.get("step")
    at_epoch_end = bool(steps_per_epoch) and isinstance(step, int) and step % steps_per_epoch == 0
    # Mid-epoch the rest of the epoch is drawn in the checkpoint's order; at an epoch's end, in this run's.
    order = data_order if at_epoch_end else old_order
    changes = config_changes(saved, to_dict(cfg), old_world)
    old_global = saved_global_batch(saved.get("train") or {}, old_world) if isinstance(saved.get("train"), dict) \
        else None
    # A null train.global_batch saved, the same number set now: the same steps, not a change.
    changes = [(key, old, new) for key, old, new in changes
               if not (key == "train.global_batch" and old is None and new == old_global)]
    old_format = saved_meta.get("checkpoint_format")  # the engine family: torch file, dcp, deepspeed
    if old_format and old_format != checkpoint_format:
        changes.append((ENGINE_FAMILY, f"{saved_meta.get('engine')} ({old_format} checkpoint)",
                        f"{cfg.engine.name} ({checkpoint_format} checkpoint)"))
    if saved_meta.get(WORLD_SIZE) is not None and old_world != world_size:
        changes.append((WORLD_SIZE, old_world, world_size))
    if old_order != data_order and not at_epoch_end:
        changes.append((DATA_ORDER_KEY, old_order, data_order))
    refused, warnings = [], []
    for key, old, new in changes:
        reason = next((why for prefix, why in REFUSED if _matches(key, prefix)), None)
        if key == ENGINE_FAMILY:
            reason = "the checkpoint format"
        elif key == DATA_ORDER_KEY:
            reason = _order_reason(old, new, step, steps_per_epoch)
        elif key == WORLD_SIZE:
            reason = _world_size_reason(cfg, order, old_global)
            if reason is None:  # allowed: the global batch is kept, each rank's share re-derived
                warnings.append(f"resuming {checkpoint} on {new} ranks (written on {old}): global batch "
                                f"{cfg.train.global_batch} kept, {cfg.train.global_batch // new} images per rank")
                continue
        elif key == "train.micro_batch" and cfg.train.global_batch is None:
            reason = "the data order (it is each rank's batch while train.global_batch is null)"
        elif key == "data.num_workers" and order not in ELASTIC_ORDERS:
            reason = "the data order (shards are dealt to world_size x num_workers readers)"
        if reason is not None and (key == DATA_ORDER_KEY or not any(_matches(key, accepted) for accepted in allowed)):
            refused.append(f"{key}: {old!r} -> {new!r} (changes {reason})")
        elif reason is not None or any(_matches(key, prefix) for prefix in WARNED):
            warnings.append(f"resuming {checkpoint} with {key} changed: {old!r} -> {new!r}")
    if refused:
        # data_order is no config key, so train.resume_allow_changes cannot name it: its reason says what to do.
        keys = [k.split(":")[0] for k in refused if k.split(":")[0] != DATA_ORDER_KEY]
        raise CheckpointError(
            f"cannot resume {checkpoint}: the config differs from the checkpoint's in "
            + "; ".join(refused)
            + (". Restore these values, start a new run in another train.output_dir, or (experts) accept them with "
               "train.resume_allow_changes=[" + ",".join(keys) + "]" if keys else ""))
    return warnings
