"""Objectives; each registers itself in OBJECTIVES on import."""
from . import asl, mae, ocl  # noqa: F401  (registration)
from .base import (OBJECTIVES, FeatureGather, Objective, ObjectiveBatch, ObjectiveNeeds, ObjectiveOutput,
                   build_objective, fp32_region, local_gather)
from .asl import ASLObjective
from .mae import MAEObjective
from .ocl import OCLObjective, tsp_similarity

__all__ = ["OBJECTIVES", "ASLObjective", "FeatureGather", "MAEObjective", "OCLObjective", "Objective", "ObjectiveBatch", "ObjectiveNeeds",
           "ObjectiveOutput", "build_objective", "fp32_region", "local_gather", "tsp_similarity"]
