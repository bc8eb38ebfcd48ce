"""Objectives; each registers itself in OBJECTIVES on import."""
from . import asl, mae, ocl  # noqa: F401  (registration)
from .base import (OBJECTIVES, FeatureGather, Objective, ObjectiveBatch, ObjectiveNeeds, ObjectiveOutput,
                   build_objective, fp32_region, local_gather)
from .asl import ASLConfig, ASLObjective, ASLObjectiveConfig
from .mae import DecoderConfig, MAEConfig, MAEObjective
from .ocl import HeadConfig, OCLConfig, OCLObjective, tsp_similarity

__all__ = ["OBJECTIVES", "ASLConfig", "ASLObjective", "ASLObjectiveConfig", "DecoderConfig", "HeadConfig", "MAEConfig",
           "OCLConfig", "FeatureGather", "MAEObjective", "OCLObjective", "Objective", "ObjectiveBatch", "ObjectiveNeeds",
           "ObjectiveOutput", "build_objective", "fp32_region", "local_gather", "tsp_similarity"]
