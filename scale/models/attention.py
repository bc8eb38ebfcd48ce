"""Self-attention with a selectable kernel: xFormers, PyTorch SDPA, or plain math.

Subclasses timm's Attention so parameter names (qkv, proj, q_norm, k_norm) stay those of
timm's VisionTransformer; only the kernel that combines q, k and v changes.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from timm.layers import Attention

from ..config import ConfigError
BACKENDS = ("xformers", "sdpa", "math")


@functools.lru_cache(maxsize=None)
def xformers_available() -> bool:
    """Whether xformers imports (it may still lack kernels for this torch: `xformers_problem`)."""
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build
        return False
    return True


@functools.lru_cache(maxsize=None)
def xformers_problem(device: torch.device) -> str | None:
    """None when xformers' memory-efficient attention runs forward and backward on `device` in fp32
    and bf16; else why not, in one line. Importing is not enough: a wheel built for another torch or
    CUDA imports fine and then finds no operator (seen with xformers 0.0.35 on torch 2.11 + CUDA 13)."""
    if not xformers_available():
        return "xformers does not import"
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 8, 2, 64, device=device, dtype=dtype, requires_grad=True)
        try:
            attention_xformers(q, q, q, 0.125).sum().backward()
        except Exception as err:  # NotImplementedError "No operator found ...", or a CUDA error
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"xformers cannot run {dtype} attention on {device}: {first_line}"
    return None


# On CPU, plain math attention beats SDPA's kernel on short sequences: 1.12x the whole OCL step of the
# demo recipe (patch 7, sequences of at most 17 tokens), and equal at patch 4 (50): docs/throughput.md.
CPU_MATH_MAX_TOKENS = 64


def resolve_backend(requested: str, device: torch.device, max_tokens: int | None = None) -> str:
    """`auto` -> xformers on CUDA when its kernels run there, else SDPA; on CPU, math when the longest
    sequence the model attends over (`max_tokens`) is at most CPU_MATH_MAX_TOKENS. Explicit requests are checked."""
    if requested == "auto":
        if device.type == "cuda":
            return "sdpa" if xformers_problem(device) else "xformers"
        short = device.type == "cpu" and max_tokens is not None and max_tokens <= CPU_MATH_MAX_TOKENS
        return "math" if short else "sdpa"
    if requested not in BACKENDS:
        raise ConfigError(f"model.attn_backend must be one of auto, {', '.join(BACKENDS)}; got {requested!r}")
    if requested == "xformers":
        if device.type != "cuda":
            raise ConfigError("model.attn_backend=xformers needs a CUDA device (xFormers has no CPU kernels)")
        problem = xformers_problem(device)
        if problem:
            raise ConfigError(f"model.attn_backend=xformers but {problem}; install the xformers build that "
                              "matches this torch and CUDA, or use attn_backend=sdpa (or auto)")
    return requested


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference: softmax(q k^T * scale) v, on (B, H, N, D) tensors, in float32."""
    attn = (q.float() * scale) @ k.float().transpose(-2, -1)
    return (attn.softmax(dim=-1) @ v.float()).to(q.dtype)


def attention_xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    import xformers.ops as xops

    # xFormers wants (B, N, H, D).
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


class BackendAttention(Attention):
    """timm Attention whose kernel is chosen by `self.backend` (set by the model)."""

    backend: str = "sdpa"

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale) of (B, N, D) tokens: (B, H, N, N) in float32 (model signals, not training)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        return ((q.float() * self.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("scale's encoder attends over whole visible sequences; no masks")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.backend == "xformers":
            x = attention_xformers(q, k, v, self.scale)
        elif self.backend == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            x = attention_math(q, k, v, self.scale)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))
