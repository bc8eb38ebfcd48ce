"""The optional projection head of the paper's ablation (MoCo v3 / SimCLR style)."""
from __future__ import annotations

import torch.nn as nn

from ..config import ConfigError


def mlp_head(in_dim: int, num_layers: int, hidden_dim: int = 1024, out_dim: int = 512) -> nn.Module:
    """`num_layers` Linear layers, BatchNorm after each, GELU after all but the last."""
    if num_layers < 2:
        raise ConfigError(f"objective.head.layers must be 2 or 3 for an MLP head, got {num_layers}")
    layers = []
    dim = in_dim
    for i in range(num_layers):
        last = i == num_layers - 1
        out = out_dim if last else hidden_dim
        layers.append(nn.Linear(dim, out, bias=False))
        # The output BN has no affine part, as in MoCo v3.
        layers.append(nn.BatchNorm1d(out, affine=not last))
        if not last:
            layers.append(nn.GELU())
        dim = out
    return nn.Sequential(*layers)
