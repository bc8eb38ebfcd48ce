"""Objectives; each registers itself in OBJECTIVES on import."""
from . import mae, ocl  # noqa: F401  (registration)
from .base import (OBJECTIVES, FeatureGather, Objective, ObjectiveBatch, ObjectiveNeeds, ObjectiveOutput,
                   build_objective, fp32_region, local_gather)
from .mae import MAEObjective
from .ocl import OCLObjective, tsp_similarity

__all__ = ["OBJECTIVES", "FeatureGather", "MAEObjective", "OCLObjective", "Objective", "ObjectiveBatch", "ObjectiveNeeds",
           "ObjectiveOutput", "build_objective", "fp32_region", "local_gather", "tsp_similarity"]
