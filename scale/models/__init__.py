"""Encoders. `MODELS` maps preset names to ViTSpec builders."""
from .attention import BACKENDS, resolve_backend
from .vit import MODELS, VisibleTokenViT, ViTSpec, build_encoder

__all__ = ["BACKENDS", "MODELS", "VisibleTokenViT", "ViTSpec", "build_encoder", "resolve_backend"]
