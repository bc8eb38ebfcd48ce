"""WebDataset shard sets: writing them (converters from image folders and Fashion-MNIST), their
manifest.json, and verifying them.

    manifest.py       the manifest format: writer and reader together ("scale-wds-v1")
    shard_writing.py  reproducible, resumable tar shard writing
    source_tree.py    listing a source folder once per real file (also used by scale.data.image_folder)
    imagefolder.py    ImageFolder / labelled folder -> shards   (scale-prep-imagefolder)
    fashion_mnist.py  Fashion-MNIST IDX files -> shards         (scale-prep-fashion-mnist)
    verify.py         shards checked against their manifest     (scale-verify-shards)

The scripts in the checkout's data_prep/ folder (`python -m data_prep.imagefolder_to_wds`,
`python data_prep/verify_shards.py`) are thin entry points over these modules.
"""

import argparse

from scale.errors import UserError


class DataPrepError(UserError):
    """A problem with the user's input or output folder; the commands print it as one line and exit 2
    (`scale.errors.run_command`), like every other user error of the project."""


def positive_int(text: str) -> int:
    """argparse type shared by the commands: a clear error for anything but an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
