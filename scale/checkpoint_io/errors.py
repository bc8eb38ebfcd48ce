"""The ways a checkpoint can be unusable, all one-line `UserError`s naming the path."""
from __future__ import annotations

from ..errors import UserError


class CheckpointError(UserError):
    """A checkpoint directory that cannot be used (missing, truncated, corrupt, incompatible, disk full)."""


class CheckpointFileError(UserError):
    """A checkpoint file that cannot be read safely (missing, truncated, corrupt or not plain data)."""


class CheckpointFormatError(UserError, ValueError):
    """A path that is not a checkpoint this code can read."""
