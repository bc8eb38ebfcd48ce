"""DeepSpeed ZeRO stage 1/2/3, configured from a JSON recipe (recipes/deepspeed/zero*.json).

Our torch AdamW (with our parameter groups) is the client optimizer, so no DeepSpeed op
has to be JIT-compiled; our schedule sets its learning rates every step. Values marked
"auto" in the JSON are filled from the run config: micro-batch and train batch from the
per-rank / global batch, gradient clipping from optim.clip_grad (DeepSpeed clips
inside its optimizer), and bf16 from train.precision as everywhere else (auto: bf16 on
CUDA, fp32 on CPU; an explicit bf16 is honoured on CPU too, slowly). DeepSpeed's own
gradient_accumulation_steps stays 1: micro-batches (gradient caching for OCL, exact
accumulation for MAE) run inside one DeepSpeed step, under `accumulation_scope`.

bf16 is DeepSpeed's `torch_autocast` mode, not its `bf16` mode: parameters, gradients and
the optimizer's master copies stay fp32, the encoder computes in bf16 under autocast, and
the objective (OCL's temperature, the optional head) computes in fp32 with fp32
parameters (PretrainModule.score turns autocast off), as under FSDP2's fp32 objective
policy. DeepSpeed's bf16 mode casts every parameter to bf16, the temperature included
(a log-temperature near -2.7 then moves in steps of 1/64, and a head's fp32 input meets
bf16 weights), and ZeRO-3 refuses a module whose parameters mix dtypes, so a JSON that
enables it is refused.

The objective's parameter bounds (OCL's log-temperature) are applied after each step to
the optimizer's fp32 master copy as well as to the module's copy: the optimizer steps
its master copy and overwrites the module's from it.

Checkpoints are DeepSpeed's own (engine.save_checkpoint/load_checkpoint), with our
trainer state as client state, written and read by scale/checkpoint_io/deepspeed.py with
torch.load(weights_only=True), allowing only the data classes DeepSpeed's own checkpoints
hold, so a crafted checkpoint cannot run code on resume or export; a config asking for
DeepSpeed's universal checkpoints (read with pickle) is refused here. A checkpoint written on
another number of ranks is gathered whole from every old rank's partitions and set into this
engine's (ZeRO 1/2/3; scale/checkpoint_io/deepspeed.py), so a run resumes on any world size.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Literal, Optional

import torch
import torch.nn as nn

from ..checkpoint_io import deepspeed as deepspeed_checkpoint
from ..checkpoint_io.deepspeed import FORCE_WEIGHTS_ONLY  # noqa: F401  (re-exported: tests read it here)
from ..config import ConfigError, EngineConfig
from ..device import autocast_dtype
from ..recipe_catalog import deepspeed_config as shipped_deepspeed_config
from .base import ENGINES, Engine, EngineRun, OptimizerFactory
from .distributed import (DistributedEngine, enable_method_dispatch, grad_norm_tensor, promote_scalar_parameters,
                          restore_parameter_shapes)
from .batch_plan import BatchPlan

BF16_NAMES = ("bfloat16", "bf16", "torch.bfloat16")  # DeepSpeed's spellings of torch.bfloat16


@dataclasses.dataclass
class DeepSpeedConfig:
    """DeepSpeed's keys (engine.*)."""
    deepspeed_config: str = ""  # DeepSpeed JSON; "" -> recipes/deepspeed/zero{zero_stage}.json
    zero_stage: Optional[Literal[0, 1, 2, 3]] = None  # overrides the JSON's zero_optimization.stage


def _ensure_extensions_dir() -> None:
    """DeepSpeed may JIT-compile ops into TORCH_EXTENSIONS_DIR: make sure it is writable."""
    current = os.environ.get("TORCH_EXTENSIONS_DIR")
    candidates = [current] if current else [os.path.expanduser("~/.cache/torch_extensions"),
                                            os.path.join(tempfile.gettempdir(), f"torch_extensions_{os.getuid()}")]
    for path in candidates:
        try:
            os.makedirs(path, exist_ok=True)
            if os.access(path, os.W_OK):
                os.environ["TORCH_EXTENSIONS_DIR"] = path
                return
        except OSError:
            continue
    raise RuntimeError(f"no writable TORCH_EXTENSIONS_DIR among {candidates}; export one")


def deepspeed_config(cfg: DeepSpeedConfig, run: EngineRun, plan: BatchPlan, device: torch.device) -> Dict[str, Any]:
    """The JSON recipe with "auto" values filled and CPU/precision patches applied."""
    # Under `accelerate launch --config_file recipes/accelerate/deepspeed.yaml`, accelerate's
    # deepspeed_config_file / zero_stage apply where the run config leaves them unset.
    env_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    stage = cfg.zero_stage if cfg.zero_stage is not None else (int(env_stage) if env_stage else None)
    path_text = cfg.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    path = Path(path_text) if path_text else shipped_deepspeed_config(2 if stage is None else stage)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {str(path)!r} does not exist (engine.deepspeed_config / engine.zero_stage)")
    with open(path) as f:
        try:
            ds = json.load(f)
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON ({err}); "
                              "see recipes/deepspeed/zero*.json") from None
    zero = ds.setdefault("zero_optimization", {})
    if stage is not None:
        zero["stage"] = stage

    def fill(key: str, value: Any, node: Dict[str, Any] = ds, section: str = "") -> None:
        if node.get(key, "auto") == "auto":
            node[key] = value
        elif node[key] != value:
            raise ConfigError(f"{path}: {section}{key}={node[key]!r} contradicts the run config ({value!r}); "
                              f"set it to \"auto\"")

    fill("train_micro_batch_size_per_gpu", plan.per_rank_batch)
    fill("train_batch_size", plan.global_batch)
    fill("gradient_accumulation_steps", 1)
    fill("gradient_clipping", float(run.clip_grad or 0.0))
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{path}: fp16 is not supported (OCL's logits / temperature overflow fp16); use bf16")
    if ds.get("bf16", {}).get("enabled", "auto") not in ("auto", False):
        raise ConfigError(f"{path}: bf16.enabled={ds['bf16']['enabled']!r} is DeepSpeed's bf16 mode, which casts "
                          f"every parameter to bf16, OCL's temperature included; remove it or set it to false "
                          f"(train.precision=bf16 runs under torch_autocast: fp32 parameters, bf16 encoder compute)")
    ds.setdefault("bf16", {})["enabled"] = False
    # train.precision decides, as for the other engines (scale.device.autocast_dtype).
    autocast = ds.setdefault("torch_autocast", {})
    fill("enabled", autocast_dtype(run.precision, device) is not None, autocast, "torch_autocast.")
    if autocast.get("dtype", "auto") == "auto":
        autocast["dtype"] = "bfloat16"
    elif autocast["dtype"] not in BF16_NAMES:
        raise ConfigError(f"{path}: torch_autocast.dtype={autocast['dtype']!r}; only bfloat16 is supported "
                          f"(OCL's logits / temperature overflow fp16)")
    if ds.get("checkpoint", {}).get("load_universal"):
        raise ConfigError(f"{path}: checkpoint.load_universal is not supported (DeepSpeed reads universal "
                          f"checkpoints with pickle, which can run code; resume from this engine's checkpoints)")
    if device.type != "cuda":
        zero["overlap_comm"] = False  # a side CUDA stream; nothing to overlap on CPU
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 1 << 30)
    return ds


def _dataclass_outputs_as_namedtuples(module: nn.Module) -> None:
    """ZeRO-3 re-gathers a module's parameters for backward from hooks on the tensors of its
    outputs, and finds them only in tensors, tuples (namedtuples too), lists and dicts. The
    objective returns a dataclass (ObjectiveOutput), so convert it to a namedtuple with the
    same fields (callers read .loss / .metrics either way). The hooks are registered before
    DeepSpeed's, so they run first."""
    types: Dict[type, type] = {}

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if not dataclasses.is_dataclass(output) or isinstance(output, type):
            return None
        cls = type(output)
        if cls not in types:
            types[cls] = collections.namedtuple(f"{cls.__name__}Tuple", [f.name for f in dataclasses.fields(cls)])
        return types[cls](**{f.name: getattr(output, f.name) for f in dataclasses.fields(cls)})

    for sub in module.modules():
        sub.register_forward_hook(hook)


class DeepSpeedEngine(DistributedEngine):
    name = "deepspeed"
    checkpoint_format = deepspeed_checkpoint.FORMAT

    def __init__(self, device: torch.device, cfg: EngineConfig, run: EngineRun):
        super().__init__(device, cfg, run)
        _ensure_extensions_dir()
        self.ds = None

    @property
    def sharded_state(self) -> bool:  # ZeRO-3 partitions the parameters themselves
        return self.zero_stage == 3

    @property
    def zero_stage(self) -> int:
        return int(self.ds.zero_optimization_stage())

    def setup(self, module: nn.Module, build_optimizer: OptimizerFactory, plan: BatchPlan) -> None:
        import deepspeed

        module = enable_method_dispatch(module).to(self.device)
        self._shapes = promote_scalar_parameters(module)  # DeepSpeed cannot broadcast 0-d parameters
        optimizer = build_optimizer(module)
        self.ds_config = deepspeed_config(self.cfg, self.run, plan, self.device)
        if self.ds_config["zero_optimization"].get("stage", 0) == 3:
            _dataclass_outputs_as_namedtuples(module)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                              config=self.ds_config, dist_init_required=False)
        self.module = self.ds

    def unwrapped(self) -> nn.Module:
        return self.ds.module

    @contextlib.contextmanager
    def full_parameters(self, prefix: str) -> Iterator[Dict[str, torch.Tensor]]:
        """ZeRO-3: gathered for the duration (collective); ZeRO-0/1/2 hold them whole."""
        import deepspeed

        named = [(name[len(prefix):], param) for name, param in self.unwrapped().named_parameters()
                 if name.startswith(prefix)]
        gathered = (deepspeed.zero.GatheredParameters([p for _, p in named]) if self.zero_stage == 3
                    else contextlib.nullcontext())
        with gathered:
            yield {name: param.detach() for name, param in named}

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    @contextlib.contextmanager
    def accumulation_scope(self) -> Iterator[None]:
        """All backwards of one step in micro-batches (gradient caching or accumulation), reduced once at the end.

        DeepSpeed forbids no_sync under ZeRO-2/3 (their gradients are partitioned as
        they are produced); its coalesce_grad_reduction keeps every backward's gradients
        local and reduces once on exit. Without it (older DeepSpeed), the accumulation
        boundary is moved to the last backward instead (ZeRO-1 then reduces once; ZeRO-2/3
        reduce their partitions per backward, DeepSpeed's design).
        """
        coalesce = getattr(self.ds, "coalesce_grad_reduction", None)
        if coalesce is not None and self.zero_stage >= 1 and hasattr(self.ds.optimizer, "_coalesce_grad_reduction"):
            self._boundary_managed = False
            with coalesce():
                yield
            return
        self._boundary_managed = True
        try:
            yield
        finally:
            self._boundary_managed = False
            self.ds.set_gradient_accumulation_boundary(True)

    _boundary_managed = False

    def grad_sync(self, enabled: bool):
        if self._boundary_managed:
            self.ds.set_gradient_accumulation_boundary(enabled)
        return contextlib.nullcontext()

    def step(self, clip_grad: Optional[float]) -> Optional[torch.Tensor]:
        # Clipping is DeepSpeed's (gradient_clipping, set from optim.clip_grad at setup).
        self.ds.step()
        self.apply_parameter_bounds()
        return grad_norm_tensor(self.ds.get_global_grad_norm(), self.device)

    @torch.no_grad()
    def apply_parameter_bounds(self) -> None:
        """Clamp the fp32 master copy the optimizer steps, and the module's copy.

        Clamping the module's copy alone would be undone: after every step ZeRO copies its
        master weights over the module's, so the master value would run past the bound and
        stay there. Collective (every rank's step runs it): under ZeRO-1/2 reading the full
        master value all-reduces it; under ZeRO-3 each rank clamps its own fp32 partition and
        the module's copy is gathered, clamped and re-partitioned.
        """
        import deepspeed
        from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param,
                                     safe_set_local_fp32_param)

        for param, low, high in self.bounded_parameters():
            if self.zero_stage == 3:
                # safe_set_full_fp32_param cannot write a parameter smaller than the rank count
                # (its narrow runs past the value); a clamp is elementwise, so clamp locally.
                local = safe_get_local_fp32_param(param)
                if local is not None:  # None: frozen, no master copy
                    safe_set_local_fp32_param(param, local.clamp(low, high))
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.clamp_(low, high)
            else:
                master = safe_get_full_fp32_param(param)  # None: frozen, or no ZeRO (the module's copy is stepped)
                if master is not None:
                    safe_set_full_fp32_param(param, master.clamp(low, high))
                param.clamp_(low, high)

    def save(self, directory: Path, extra: Dict[str, Any]) -> None:
        deepspeed_checkpoint.save(self.ds, directory, extra)

    def load(self, directory: Path) -> Dict[str, Any]:
        return deepspeed_checkpoint.load(self.ds, directory)

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Collective under ZeRO-3 (every rank must call it); fp32 master weights where DeepSpeed keeps them."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.ds.module
        gathered = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
                    if self.zero_stage == 3 else contextlib.nullcontext())
        with gathered:
            state = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                     for k, v in module.state_dict().items()}
        if self.ds.bfloat16_enabled():
            for name, param in module.named_parameters():
                if param.requires_grad:
                    full = safe_get_full_fp32_param(param)
                    if full is not None:
                        state[name] = full.detach().float().cpu().clone()
        return restore_parameter_shapes(state, self._shapes)


@ENGINES.register("deepspeed", config=DeepSpeedConfig)
def build_deepspeed(device: torch.device, cfg: EngineConfig, run: EngineRun, **_: Any) -> Engine:
    return DeepSpeedEngine(device, cfg, run)
