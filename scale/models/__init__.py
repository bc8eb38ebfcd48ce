"""Encoders. `MODELS` maps preset names to ViTSpec builders."""
from .attention import BACKENDS, resolve_backend
from .vit import MODELS, EncoderOutput, VisibleTokenViT, ViTSpec, build_encoder, model_spec

__all__ = ["BACKENDS", "MODELS", "EncoderOutput", "VisibleTokenViT", "ViTSpec", "build_encoder", "model_spec", "resolve_backend"]
