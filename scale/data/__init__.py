"""Data sources: every builder registers itself in DATASETS on import."""
from . import image_folder, synthetic, wds_stream  # noqa: F401  (registration)
from .base import DATASETS, Batch, LoaderSpec, PretrainData, build_dataset

__all__ = ["DATASETS", "Batch", "LoaderSpec", "PretrainData", "build_dataset"]
