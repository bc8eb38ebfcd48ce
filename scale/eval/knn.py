"""Weighted k-NN classification of frozen CLS features (DINO's monitor).

Features are L2-normalised; each query takes its k most cosine-similar bank samples,
each neighbour votes for its class with weight exp(sim / T), and the class with the
largest summed weight wins (k = 20, T = 0.07 by default, as DINO does).

Used three ways: `knn_accuracy` on tensors, `KnnMonitor` at epoch ends during
pre-training (a trainer Monitor, built by `build_monitors`), and `python -m scale.eval knn` on a checkpoint.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..config import ConfigError, EvalConfig, RunConfig
from ..models.vit import ViTSpec
from ..trainer.monitors import Monitor
from .features import Features, build_split, extract_features


def validate_eval_config(cfg: EvalConfig) -> None:
    if cfg.knn_k < 1:
        raise ConfigError(f"eval.knn_k must be >= 1, got {cfg.knn_k}")
    if cfg.knn_temperature <= 0:
        raise ConfigError(f"eval.knn_temperature must be > 0, got {cfg.knn_temperature}")
    if cfg.knn_every_epochs < 0 or cfg.max_train_samples < 0 or cfg.max_val_samples < 0:
        raise ConfigError("eval.knn_every_epochs, eval.max_train_samples and eval.max_val_samples must be >= 0")
    if cfg.micro_batch < 1:
        raise ConfigError(f"eval.micro_batch must be >= 1, got {cfg.micro_batch}")


@torch.no_grad()
def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *, k: int = 20,
               temperature: float = 0.07, num_classes: Optional[int] = None, chunk: int = 1024) -> torch.Tensor:
    """(Q, C) summed neighbour weights per class. Inputs need not be normalised."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    num_classes = num_classes or int(bank_labels.max()) + 1
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank.T  # cosine similarity
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels.to(sim.device)[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(bank: Features, queries: Features, *, k: int = 20, temperature: float = 0.07,
                 device: Optional[torch.device] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) of weighted k-NN."""
    (bank_x, bank_y), (query_x, query_y) = bank, queries
    device = device or bank_x.device
    num_classes = int(max(bank_y.max(), query_y.max())) + 1
    scores = knn_scores(bank_x.to(device), bank_y.to(device), query_x.to(device), k=k, temperature=temperature,
                        num_classes=num_classes).cpu()
    ranked = scores.topk(min(5, num_classes), dim=1).indices
    hits = ranked == query_y.view(-1, 1)
    return {"top1": 100.0 * hits[:, 0].float().mean().item(), "top5": 100.0 * hits.any(1).float().mean().item()}


class KnnMonitor(Monitor):
    """kNN top-1/top-5 of the encoder on (data.root as bank, data.val_root as queries)."""

    def __init__(self, cfg: RunConfig, spec: ViTSpec):
        validate_eval_config(cfg.eval)
        self.cfg, self.spec = cfg, spec
        self.every_epochs = cfg.eval.knn_every_epochs
        self._splits = None  # built on first use: the trainer must not pay for it when the monitor is off

    def splits(self):
        if self._splits is None:
            self._splits = (build_split(self.cfg.data, self.spec, train=True),
                            build_split(self.cfg.data, self.spec, train=False))
        return self._splits

    def evaluate(self, encoder: torch.nn.Module, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
                 progress: bool = False) -> Dict[str, float]:
        e = self.cfg.eval
        bank_split, query_split = self.splits()
        start = time.perf_counter()
        common = dict(device=device, batch_size=e.micro_batch, amp_dtype=amp_dtype,
                      num_workers=self.cfg.data.num_workers, seed=self.cfg.train.seed, progress=progress)
        bank = extract_features(encoder, bank_split, max_samples=e.max_train_samples, desc="kNN bank", **common)
        queries = extract_features(encoder, query_split, max_samples=e.max_val_samples, desc="kNN queries",
                                   **common)
        acc = knn_accuracy(bank, queries, k=e.knn_k, temperature=e.knn_temperature, device=device)
        return {"knn_top1": acc["top1"], "knn_top5": acc["top5"], "knn_bank": float(bank[0].shape[0]),
                "knn_queries": float(queries[0].shape[0]), "knn_seconds": time.perf_counter() - start}

    def describe(self, record: Dict[str, float]) -> str:
        return (f"kNN top-1 {record['knn_top1']:.2f}% top-5 {record['knn_top5']:.2f}% ({int(record['knn_bank'])} bank / "
                f"{int(record['knn_queries'])} queries, {record['knn_seconds']:.1f}s)")


def build_monitors(cfg: RunConfig, spec: ViTSpec) -> List[Monitor]:
    """The monitors a pre-training run's config asks for (eval.knn_every_epochs > 0: the kNN monitor)."""
    return [KnnMonitor(cfg, spec)] if cfg.eval.knn_every_epochs > 0 else []
