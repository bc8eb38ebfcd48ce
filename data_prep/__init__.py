"""Offline conversion of image data sets into WebDataset tar shards (see the scripts in this folder)."""

import argparse

from scale.errors import UserError


class DataPrepError(UserError):
    """A problem with the user's input or output folder; the scripts print it as one line and exit 2
    (`scale.errors.run_command`), like every other user error of the project."""


def positive_int(text: str) -> int:
    """argparse type shared by the scripts: a clear error for anything but an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
