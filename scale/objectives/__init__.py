"""Objectives; each registers itself in OBJECTIVES on import."""
from . import ocl  # noqa: F401  (registration)
from .base import OBJECTIVES, FeatureGather, Objective, ObjectiveOutput, build_objective, local_gather
from .ocl import OCLObjective, tsp_similarity

__all__ = ["OBJECTIVES", "FeatureGather", "OCLObjective", "Objective", "ObjectiveOutput", "build_objective",
           "local_gather", "tsp_similarity"]
