"""The webdataset source's keys (data.*), apart from its reader (scale/data/wds_stream.py) so that
a run config knows them without importing `webdataset`: the source registers lazily."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Check


@dataclass
class WebDatasetConfig:
    resampled: bool = False  # infinite stream cut into fixed-size epochs (data.num_samples, or the manifest's count)
    manifest: str = ""  # manifest path (default: next to the shards)

    def validate(self, check: Check) -> None:
        check.unused("num_samples", not self.resampled,
                     "data.resampled is false (an epoch is every sample of the shards, counted by the manifest)")
