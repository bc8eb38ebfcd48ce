"""Mask generators; each registers itself in MASK_GENERATORS on import."""
from . import random_groups  # noqa: F401  (registration)
from .base import (MASK_GENERATORS, MaskContext, MaskGenerator, MaskNeeds, Masks, ModelSignal, build_mask_generator,
                   seed_global_rng, step_generator)
from .random_groups import RandomGroupMasking

__all__ = ["MASK_GENERATORS", "MaskContext", "MaskGenerator", "MaskNeeds", "ModelSignal", "Masks", "RandomGroupMasking", "build_mask_generator",
           "seed_global_rng", "step_generator"]
