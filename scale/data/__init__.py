"""Data sources: every builder registers itself in DATASETS on import; webdataset lazily, so that a run
on other data never imports the `webdataset` package (its keys are known from scale/data/wds_config.py)."""
from . import image_folder, synthetic  # noqa: F401  (registration)
from .base import DATASETS, Batch, LoaderSpec, PretrainData, build_dataset
from .wds_config import WebDatasetConfig

DATASETS.register_lazy("webdataset", "scale.data.wds_stream", config=WebDatasetConfig)

__all__ = ["DATASETS", "Batch", "LoaderSpec", "PretrainData", "build_dataset"]
