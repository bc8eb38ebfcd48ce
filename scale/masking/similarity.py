"""Patch similarities from a model's attention, for EHM's patch trees (`hierarchy.py`)."""
from __future__ import annotations

from typing import Callable, Dict

import torch


def patch_similarity(attention: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, 1 + N) attention with [CLS] first -> (B, N, N) symmetric fp32 patch similarity,
    zero diagonal (a patch is not merged with itself)."""
    a = attention[:, 1:, 1:].float()
    s = (a + a.transpose(1, 2)) / 2
    return s * (1 - torch.eye(s.shape[-1], device=s.device, dtype=s.dtype))


def attention_row_similarity(attention: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, 1 + N) attention -> (B, N, N) cosine similarity of the patches' attention rows over
    the patch keys (patches alike if they attend alike), zero diagonal. An ablation: symmetrised
    attention is dominated by how much each key is attended overall, (p_i + p_j) / 2, under which
    average linkage grows one chain; attention rows compare what each patch looks at."""
    rows = torch.nn.functional.normalize(attention[:, 1:, 1:].float(), dim=-1)
    s = rows @ rows.transpose(1, 2)
    s = (s + s.transpose(1, 2)) / 2  # exactly symmetric despite the matmul's rounding
    return s * (1 - torch.eye(s.shape[-1], device=s.device, dtype=s.dtype))


SIMILARITIES: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "attention": patch_similarity,
    "attention_rows": attention_row_similarity,
}
