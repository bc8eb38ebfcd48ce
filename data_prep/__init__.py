"""Offline conversion of image data sets into WebDataset tar shards (see the scripts in this folder)."""


class DataPrepError(Exception):
    """A problem with the user's input or output folder; the scripts print it as one clear line and exit 1."""
