"""Per-block activation checkpointing and torch.compile, applied to the encoder from outside.

The engines shard / replicate whatever they are handed, so these wrappers are applied to
the encoder's blocks *before* `engine.setup`, in the order FSDP2 expects (torchtitan's):
activation checkpointing -> torch.compile -> fully_shard. Model code knows nothing of them.

Parameter names never change. `checkpoint_wrapper` (torch.distributed.algorithms) and
`torch.compile(module)` both insert a submodule level (`_checkpoint_wrapped_module.`,
`_orig_mod.`): state_dict hooks and DCP hide it, but `named_parameters()` does not, and
DeepSpeed's checkpoints, parameter-name based optimizer groups and anything else reading
parameter names would see non-timm names. Instead, like `fully_shard` itself, each block
is modified in place:

- activation checkpointing swaps the block's class for a subclass whose `forward` runs
  the original forward under `torch.utils.checkpoint.checkpoint(use_reentrant=False)`:
  only the block's input is kept; its activations are recomputed in backward;
- compile replaces the block's `forward` (an instance attribute, not `__call__`) with
  `torch.compile(forward)`: module hooks, FSDP2's unshard/reshard ones included, still
  run eagerly around the compiled region, as with torchtitan's per-block compile. An
  objective's loss methods (`compile_methods`) are compiled the same way, in place.

Both therefore leave `state_dict()`, `named_parameters()` and exported timm names exactly
as they were.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError
AC_MODES_HELP = "none | full | every_<k> (blocks k-1, 2k-1, ...) | comma-separated block indices (e.g. 0,2,5)"
_EVERY = re.compile(r"^every_([1-9][0-9]*)$")
_INDICES = re.compile(r"^\[?\s*[0-9]+(\s*,\s*[0-9]+)*\s*\]?$")


def check_ac_mode(mode: str) -> bool:
    """Whether `mode` is a well-formed train.activation_checkpointing value (depth not known yet)."""
    mode = str(mode).strip()
    return mode in ("none", "full") or bool(_EVERY.match(mode)) or bool(_INDICES.match(mode))


def ac_block_indices(mode: Union[str, Sequence[int]], depth: int) -> List[int]:
    """The blocks that `mode` checkpoints, for an encoder of `depth` blocks.

    `every_<k>` follows torchtitan's `selective_ac_option=k`: every k-th block, counting
    from 1 (k=1 is `full`; k=2 checkpoints blocks 1, 3, 5, ...).
    """
    if not isinstance(mode, str):
        indices = sorted({int(i) for i in mode})
    else:
        text = mode.strip()
        if text == "none":
            return []
        if text == "full":
            return list(range(depth))
        every = _EVERY.match(text)
        if every:
            k = int(every.group(1))
            return [i for i in range(depth) if (i + 1) % k == 0]
        if not _INDICES.match(text):
            raise ConfigError(f"train.activation_checkpointing must be {AC_MODES_HELP}; got {mode!r}")
        indices = sorted({int(i) for i in text.strip("[] ").split(",")})
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ConfigError(f"train.activation_checkpointing names block(s) {bad}, but the encoder has "
                         f"{depth} blocks (0..{depth - 1})")
    return indices


# ----------------------------------------------------------------------------- checkpointing

_AC_CLASSES: Dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """`cls` with a forward that recomputes its activations in backward (cached per class)."""
    if getattr(cls, "_scale_activation_checkpointed", False):
        return cls
    if cls not in _AC_CLASSES:
        base_forward = cls.forward

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():  # no-grad passes (eval, gradient caching's first pass)
                return base_forward(self, *args, **kwargs)
            # Non-reentrant: works with FSDP2 / DDP / torch.compile, inputs need no grad,
            # and the RNG state (dropout, drop-path) is replayed in the recomputation.
            return checkpoint(base_forward, self, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

        _AC_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (cls,),
                                {"forward": forward, "_scale_activation_checkpointed": True,
                                 "__module__": cls.__module__})
    return _AC_CLASSES[cls]


def is_checkpointed(block: nn.Module) -> bool:
    return bool(getattr(type(block), "_scale_activation_checkpointed", False))


def apply_activation_checkpointing(encoder: nn.Module, mode: Union[str, Sequence[int]] = "full") -> List[int]:
    """Checkpoint the blocks of `encoder.blocks` that `mode` selects, in place; returns their indices.

    Call before torch.compile and before the engine wraps the module (fully_shard, DDP,
    DeepSpeed). Applying it twice to a block is a no-op.
    """
    blocks = encoder.blocks
    indices = ac_block_indices(mode, len(blocks))
    for i in indices:
        block = blocks[i]
        if getattr(block, "_scale_compiled", False):
            raise RuntimeError("apply_activation_checkpointing must come before apply_compile "
                               "(AC -> compile -> fully_shard)")
        block.__class__ = _checkpointed_class(type(block))
    return indices


# ----------------------------------------------------------------------------- compile

def apply_compile(encoder: nn.Module, **compile_kwargs: Any) -> int:
    """torch.compile each block's forward in place; returns the number of blocks compiled.

    All blocks share one code object and, parameters being graph inputs, one compiled
    graph: compilation happens once, not once per block. Call after
    apply_activation_checkpointing and before the engine wraps the module.
    """
    count = 0
    for block in encoder.blocks:
        if getattr(block, "_scale_compiled", False):
            continue
        if hasattr(type(block), "__fsdp_state__") or type(block).__name__.startswith("FSDP"):
            raise RuntimeError("apply_compile must come before fully_shard (AC -> compile -> fully_shard)")
        # Bound to this block; an instance attribute shadows the class's forward only.
        block.forward = torch.compile(block.forward, **compile_kwargs)
        block._scale_compiled = True
        count += 1
    return count


def compile_methods(methods: Sequence[Tuple[nn.Module, str]], **compile_kwargs: Any) -> int:
    """torch.compile each declared (module, method name) in place, as an instance attribute that shadows
    the class's method (an objective's loss: `Objective.loss_methods`); returns how many were compiled.
    Like a block's forward, the module keeps its class, parameters and names; applying it twice is a no-op."""
    count = 0
    for module, name in methods:
        if name in vars(module):  # already shadowed by its compiled form
            continue
        setattr(module, name, torch.compile(getattr(module, name), **compile_kwargs))
        count += 1
    return count
