"""The two ways a checkpoint can be unusable, both one-line `UserError`s naming the path."""
from __future__ import annotations

from ..errors import UserError


class CheckpointFileError(UserError):
    """A checkpoint file that cannot be read safely (missing, truncated, corrupt or not plain data)."""


class CheckpointFormatError(UserError, ValueError):
    """A path that is not a checkpoint this code can read."""
