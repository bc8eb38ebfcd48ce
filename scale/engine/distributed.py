"""Process groups, collectives and timing shared by the multi-process engines.

One process per device. The launcher tells each process who it is through the
environment:

- torchrun, `accelerate launch`, the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT;
- SLURM's srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with MASTER_ADDR from the
  environment or the first host of SLURM_JOB_NODELIST, and MASTER_PORT from the
  environment or derived from SLURM_JOB_ID.

NCCL on CUDA (device cuda:LOCAL_RANK), gloo on CPU. The objectives reach the global
batch through `AllGather`, an autograd-aware all-gather: each rank's local rows are
scored against the gathered columns, and its backward sums the column gradients back
to the rank that owns them, so with gradients averaged over ranks every rank holds the
gradient of the mean of the ranks' local losses.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import UserError
from ..config import EngineConfig
from .timing import StepTimer
from .base import Engine, EngineRun

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


class DistributedEnvError(UserError, RuntimeError):
    """The launcher's environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" (also accelerate / deepspeed launchers) | "slurm" | "none"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise DistributedEnvError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedEnvError(f"{name}={env[name]!r} is not an integer") from None


def read_dist_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Who this process is, from the launcher's environment variables.

    No launcher variables at all means one process (rank 0 of 1). A launcher that set
    some of its variables but not all is an error naming the missing ones.
    """
    env = os.environ if environ is None else environ
    if any(name in env for name in TORCHRUN_VARS):
        launcher, names = "torchrun", TORCHRUN_VARS
    elif any(name in env for name in SLURM_VARS):
        launcher, names = "slurm", SLURM_VARS
    else:
        return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "0") or 0), "none")
    missing = [name for name in names if name not in env]
    if missing:
        present = ", ".join(f"{n}={env[n]}" for n in names if n in env)
        raise DistributedEnvError(
            f"{launcher} launch detected ({present}) but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set; a launcher must set all of {', '.join(names)}")
    rank, world_size, local_rank = (_int_var(env, n) for n in names)
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedEnvError(f"{names[0]}={rank} is outside [0, {names[1]}={world_size})")
    if local_rank < 0:
        raise DistributedEnvError(f"{names[2]}={local_rank} must be >= 0")

    addr = env.get("MASTER_ADDR", "")
    if not addr and launcher == "slurm" and env.get("SLURM_JOB_NODELIST"):
        addr = first_slurm_host(env["SLURM_JOB_NODELIST"])
    port_text = env.get("MASTER_PORT", "")
    if not port_text and launcher == "slurm" and env.get("SLURM_JOB_ID", "").isdigit():
        port_text = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)  # same on every task of the job
    if world_size > 1:
        if not addr:
            raise DistributedEnvError(
                f"MASTER_ADDR is not set ({launcher} launch, {names[1]}={world_size}); export the address of "
                f"rank 0's node" + (" or run inside a SLURM job (SLURM_JOB_NODELIST)" if launcher == "slurm" else ""))
        if not port_text:
            raise DistributedEnvError(
                f"MASTER_PORT is not set ({launcher} launch, {names[1]}={world_size}); export a free port on "
                f"rank 0's node" + (" or run inside a SLURM job (SLURM_JOB_ID)" if launcher == "slurm" else ""))
    port = _int_var({"MASTER_PORT": port_text or "0"}, "MASTER_PORT")
    return DistEnv(rank, world_size, local_rank, addr or "127.0.0.1", port, launcher)


def launcher_engine_name(environ: Optional[Mapping[str, str]] = None) -> str:
    """engine.name=auto: accelerate's FSDP / DeepSpeed launch configs pick those engines; otherwise
    ddp with more than one process, single with one."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "deepspeed"
    if env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "fsdp"
    return "ddp" if read_dist_env(env).world_size > 1 else "single"


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def select_device(requested: torch.device, local_rank: int) -> torch.device:
    """One device per process: cuda:LOCAL_RANK on CUDA, the CPU otherwise."""
    if requested.type != "cuda":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank < count:
        return torch.device("cuda", local_rank)
    if count == 1:  # the launcher bound one GPU per task (e.g. srun --gpus-per-task=1)
        return torch.device("cuda", 0)
    raise DistributedEnvError(f"local rank {local_rank} has no GPU: {count} visible "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")


def init_distributed(requested: torch.device, backend: str = "auto",
                     timeout_s: float = 1800.0) -> Tuple[DistEnv, torch.device, bool]:
    """Join (or create) the default process group; returns (env, device, created_here).

    The launcher's values are exported as RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* so that
    libraries that read them (DeepSpeed) agree with us whatever launched the job.
    """
    env = read_dist_env()
    device = select_device(requested, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise DistributedEnvError(f"a process group is already initialised as rank {dist.get_rank()} of "
                                      f"{dist.get_world_size()}, but the environment says {env.rank} of "
                                      f"{env.world_size}")
        return env, device, False
    if env.launcher == "none" and not env.master_port:
        env = DistEnv(0, 1, 0, env.master_addr, _free_port(), "none")
    os.environ.update({"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
                       "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": env.master_addr,
                       "MASTER_PORT": str(env.master_port)})
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistributedEnvError("engine.backend=nccl needs CUDA devices; use gloo on CPU")
    kwargs: Dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, init_method="env://", world_size=env.world_size, rank=env.rank,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return env, device, True


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    out = value.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return all_reduce_sum(value) / world


# ----------------------------------------------------------------------------- timing

class _TimeBackward(torch.autograd.Function):
    """Identity whose backward starts or stops a timer (to time a collective's backward)."""

    @staticmethod
    def forward(ctx, timer: StepTimer, token: object, start: bool, x: torch.Tensor) -> torch.Tensor:
        ctx.timer, ctx.token, ctx.start = timer, token, start
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ctx.timer.start if ctx.start else ctx.timer.stop)("allgather_bwd", ctx.token)
        return None, None, None, grad


def _autograd_all_gather(local: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, concatenated in rank order; backward sums each rank's gradient
    for these rows onto their owner (a reduce-scatter)."""
    try:  # PyTorch >= 2.10: functional collectives carry autograd
        from torch.distributed._functional_collectives import all_gather_single, wait_tensor
    except ImportError:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(local), dim=0)
    return wait_tensor(all_gather_single(local.contiguous(), 0, dist.group.WORLD))


class AllGather:
    """The multi-process `FeatureGather`: (B_local, ...) -> (world * B_local, ...), rank * B_local.

    Autograd-aware: the backward of rank r's gathered copy of rank s's rows reaches rank s,
    summed over r, so local-rows-vs-global-columns losses give every rank the full gradient
    of its embeddings. Every rank must gather the same shape. The forward collective and
    its backward are timed into `timer` ("allgather_fwd" / "allgather_bwd").
    """

    def __init__(self, timer: Optional[StepTimer] = None):
        self.timer = timer

    def __call__(self, local: torch.Tensor) -> Tuple[torch.Tensor, int]:
        offset = dist.get_rank() * local.shape[0]
        if self.timer is None:
            return _autograd_all_gather(local), offset
        token = object()  # this call's backward interval, apart from other gathers' in the same step
        local = _TimeBackward.apply(self.timer, token, False, local)
        with self.timer.time("allgather_fwd"):
            gathered = _autograd_all_gather(local)
        return _TimeBackward.apply(self.timer, token, True, gathered), offset


# ----------------------------------------------------------------------------- engines

def enable_method_dispatch(module: nn.Module) -> nn.Module:
    """Let `wrapper(*args, method="encode")` run `module.encode(*args)` through the wrapper's forward.

    DDP, FSDP2 and DeepSpeed only synchronise / unshard around `forward`; gradient caching
    needs the encoder (`encode`) and the objective (`score`) separately, and mask generators
    the model's signal (`model_signal`), each through the engine's forward. The class is swapped for a subclass with a dispatching forward (as
    FSDP2 does itself), so parameter names and state-dict keys do not change.
    """
    cls = type(module)
    if getattr(cls, "_scale_method_dispatch", False):
        return module

    def forward(self, *args, method: str = "forward", **kwargs):
        if method == "forward":
            return cls.forward(self, *args, **kwargs)
        return getattr(self, method)(*args, **kwargs)

    module.__class__ = type(f"Dispatching{cls.__name__}", (cls,),
                            {"forward": forward, "_scale_method_dispatch": True, "__module__": cls.__module__})
    return module


def promote_scalar_parameters(module: nn.Module) -> Dict[str, torch.Size]:
    """Give 0-d parameters shape (1,), in place; returns {name: original shape}.

    FSDP2 refuses to shard 0-d parameters and DeepSpeed fails to broadcast them, and OCL's
    learnable temperature is one. A (1,) temperature broadcasts exactly like a scalar in
    the loss; `restore_parameter_shapes` puts the original shapes back in exported state.
    """
    shapes = {}
    for name, param in module.named_parameters():
        if param.ndim == 0:
            param.data = param.data.reshape(1)
            shapes[name] = torch.Size([])
    return shapes


def restore_parameter_shapes(state: Dict[str, torch.Tensor], shapes: Mapping[str, torch.Size]) -> Dict[str, torch.Tensor]:
    for name, shape in shapes.items():
        if name in state:
            state[name] = state[name].reshape(shape)
    return state


class DistributedEngine(Engine):
    """Process-group set-up, the global-batch gather, barrier/all-reduce and step timing."""

    def __init__(self, device: torch.device, cfg: EngineConfig, run: EngineRun):
        env, device, self._owns_group = init_distributed(device, cfg.backend, cfg.timeout_s)
        super().__init__(device, cfg.sync_timing)
        self.cfg, self.run = cfg, run
        self.env = env
        self.rank, self.world_size, self.local_rank = env.rank, env.world_size, env.local_rank
        self._gather: Callable = AllGather(self.timer)

    def gather(self):
        return self._gather

    def invoke(self, method: str, *args: Any) -> Any:
        """Call `PretrainModule.<method>(*args)` through the engine's wrapper (see enable_method_dispatch)."""
        return self.module(*args, method=method)

    def clip_and_step(self, parameters: Iterator[nn.Parameter], clip_grad: Optional[float]) -> Optional[torch.Tensor]:
        """Clip (if asked), step, apply the parameter bounds, zero grads; return the pre-clip global
        grad norm (DDP, FSDP2)."""
        params = [p for p in parameters if p.grad is not None]
        # FSDP2's DTensor gradients: clip_grad_norm_ reduces the norm over the shards itself.
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else float("inf"))
        self.optimizer.step()
        self.apply_parameter_bounds()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm_tensor(norm, self.device)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_mean(value)

    def close(self) -> None:
        if self._owns_group:
            teardown_distributed()
            self._owns_group = False


def grad_norm_tensor(norm: Any, device: torch.device) -> Optional[torch.Tensor]:
    """A plain tensor from whatever an engine's clipping returned (DTensor, float, None)."""
    if norm is None:
        return None
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return torch.as_tensor(norm, dtype=torch.float32, device=device).detach()
