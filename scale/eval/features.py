"""Frozen-encoder features for the monitors and probes: full images, no masking, CLS output.

Evaluation splits are built with the pre-training data builders but `transform: none`
(resize + normalise, no augmentation), so the features of an image are a function of
the encoder alone. The encoder runs in eval mode (drop path off) and is put back in
the mode it was in.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from ..config import ConfigError, DataConfig, ModelConfig, _merge, apply_overrides
from ..data import LoaderSpec, PretrainData, build_dataset
from ..models import VisibleTokenViT, build_encoder
from ..models.vit import ViTSpec

Features = Tuple[torch.Tensor, torch.Tensor]  # (N, D) float32 on CPU, (N,) int64 labels


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def plain_data_config(data: DataConfig, **changes: Any) -> DataConfig:
    """`data` without augmentation (for feature extraction)."""
    return dataclasses.replace(data, transform="none", decode="cpu", **changes)


def build_split(data: DataConfig, spec: ViTSpec, train: bool, augment: bool = False) -> PretrainData:
    """The labelled split `data.root` (train) or `data.val_root` (held out), un-augmented unless asked.
    Evaluation decodes in the CPU workers (`data.decode: gpu` is a pre-training setting)."""
    data = dataclasses.replace(data, decode="cpu") if augment else plain_data_config(data)
    return build_dataset(data, spec.img_size, spec.in_chans, train=train)


CPU = torch.device("cpu")


def iterate_split(data: PretrainData, batch_size: int, *, seed: int = 0, epoch: int = 0, num_workers: int = 0,
                  drop_last: bool = False, device: torch.device = CPU,
                  ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(normalised float images on `device`, labels on the CPU) batches of one pass over `data`."""
    spec = LoaderSpec(batch_size=batch_size, seed=seed, rank=0, world_size=1, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=drop_last)
    for images, labels, _samples in data.loader(spec, epoch, 0):
        yield data.prepare(images, device), labels


def split_size(data: PretrainData, batch_size: int, max_samples: int = 0) -> int:
    """Samples one un-dropped pass yields (capped at max_samples when > 0)."""
    spec = LoaderSpec(batch_size=batch_size, seed=0, drop_last=False)
    try:
        n = data.batches_per_epoch(spec) * batch_size
        n = min(n, data.num_samples)
    except Exception:  # sources that cannot tell cheaply
        n = data.num_samples
    return min(n, max_samples) if max_samples > 0 else n


@torch.no_grad()
def extract_features(encoder: nn.Module, data: PretrainData, *, device: torch.device, batch_size: int = 256,
                     amp_dtype: Optional[torch.dtype] = None, max_samples: int = 0, num_workers: int = 0,
                     seed: int = 0, desc: str = "features", progress: bool = True) -> Features:
    """CLS features (B, D) of a whole split (or its first `max_samples` in loader order)."""
    total = split_size(data, batch_size, max_samples)
    feats, labels, seen = [], [], 0
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True)
    with eval_mode(encoder):
        for images, targets in iterate_split(data, batch_size, seed=seed, num_workers=num_workers, device=device):
            if max_samples > 0:
                images, targets = images[:max_samples - seen], targets[:max_samples - seen]
            with autocast(device, amp_dtype):
                out = encode_cls(encoder, images)
            feats.append(out.float().cpu())
            labels.append(targets.long().cpu())
            seen += images.shape[0]
            bar.update(images.shape[0])
            if 0 < max_samples <= seen:
                break
    bar.close()
    if not feats:
        raise ConfigError(f"{desc}: the split yielded no images")
    return torch.cat(feats), torch.cat(labels)


def encode_cls(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, D) CLS output of either our VisibleTokenViT (full images) or a timm ViT."""
    if isinstance(encoder, VisibleTokenViT):
        return encoder(images, None)[:, 0]
    return encoder.forward_head(encoder.forward_features(images), pre_logits=True)


# ----------------------------------------------------------------------------- checkpoints

# The keys that the weights themselves fix: an override asking for another value would be ignored.
ARCHITECTURE_KEYS = ("name", "img_size", "in_chans", "train_patch_embed")


def model_config_of(checkpoint_config: Optional[Dict[str, Any]], fallback: ModelConfig) -> ModelConfig:
    """The checkpoint's own `model` section (the weights define the architecture), else `fallback`."""
    section = (checkpoint_config or {}).get("model")
    if not section:
        return fallback
    model = ModelConfig()
    _merge(model, {k: v for k, v in section.items() if k in {f.name for f in dataclasses.fields(ModelConfig)}},
           "model.")
    return model


def check_architecture_overrides(checkpoint_config: Optional[Dict[str, Any]], overrides: Sequence[str]) -> None:
    """A `model.<key>=value` override that the checkpoint's architecture would silently beat is an error."""
    section = (checkpoint_config or {}).get("model")
    asked = [o for o in overrides if o.split("=", 1)[0].strip() in {f"model.{k}" for k in ARCHITECTURE_KEYS}]
    if not section or not asked:
        return
    saved = model_config_of(checkpoint_config, ModelConfig())
    requested = ModelConfig()
    apply_overrides(requested, [o.strip()[len("model."):] for o in asked])
    for key in ARCHITECTURE_KEYS:
        value = getattr(requested, key)
        if any(o.split("=", 1)[0].strip() == f"model.{key}" for o in asked) and value != getattr(saved, key):
            raise ConfigError(f"model.{key}={value!r} would be ignored: the checkpoint's encoder has "
                              f"model.{key}={getattr(saved, key)!r}, and its weights define the architecture; "
                              "drop the override (or evaluate a checkpoint of that model)")


def encoder_from_checkpoint(checkpoint: Any, fallback_model: ModelConfig, device: torch.device,
                            attn_backend: str = "auto") -> Tuple[VisibleTokenViT, Any]:
    """(encoder with the weights of `checkpoint` (a path or a LoadedCheckpoint) on `device`, LoadedCheckpoint)."""
    from ..checkpoint_io import LoadedCheckpoint, encoder_state_dict, load_checkpoint

    loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    model_cfg = model_config_of(loaded.config, fallback_model)
    encoder = build_encoder(model_cfg.name, img_size=model_cfg.img_size, in_chans=model_cfg.in_chans,
                            train_patch_embed=model_cfg.train_patch_embed, attn_backend="math")
    encoder.load_state_dict(encoder_state_dict(loaded.model_state, str(loaded.path)), strict=True)
    encoder.to(device)
    encoder.set_attn_backend(attn_backend)  # `auto` resolves against the device it now lives on
    encoder.requires_grad_(False)
    return encoder, loaded
