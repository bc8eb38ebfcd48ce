"""Mask generators; each registers itself in MASK_GENERATORS on import."""
from . import evolved, grid, random_groups  # noqa: F401  (registration)
from .base import (MASK_GENERATORS, MaskContext, MaskGenerator, MaskNeeds, Masks, ModelSignal, SignalRequest,
                   build_mask_generator, seed_global_rng, step_generator)
from .evolved import EHMConfig, EHMMaskConfig, EvolvedHierarchicalMasking
from .grid import GridMasking
from .hierarchy import PatchTree
from .similarity import patch_similarity
from .random_groups import RandomGroupMasking

__all__ = ["MASK_GENERATORS", "EHMConfig", "EHMMaskConfig", "EvolvedHierarchicalMasking", "GridMasking", "MaskContext", "MaskGenerator",
           "MaskNeeds", "ModelSignal", "Masks", "PatchTree", "RandomGroupMasking", "SignalRequest",
           "build_mask_generator", "patch_similarity", "seed_global_rng", "step_generator"]
