"""A checkpoint reads only its own files.

File names found inside a checkpoint (meta.json's checksummed `files`, a DCP `.metadata`'s
`_StorageInfo.relative_path`, DeepSpeed's `latest` tag) are data written by whoever wrote
the checkpoint, so they are followed only when they stay inside its directory: no absolute
path, no `..`, no symlink leading out. A name that does not is refused before anything is
opened or even stat'ed outside, so a crafted checkpoint can neither read another file nor
learn whether that file exists, how large it is or what it hashes to.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .errors import CheckpointFileError

_SHOWN_CHARS = 200  # a crafted name is shown, but never a whole crafted file's worth of it


def confined_path(checkpoint: Path, name: object, named_by: Path) -> Path:
    """`checkpoint / name` when `name` (read from the file `named_by`) resolves inside `checkpoint`;
    else a CheckpointFileError naming the checkpoint, the file and the entry."""
    refusal = CheckpointFileError(
        f"checkpoint {checkpoint}: {named_by.name} names {str(name)[:_SHOWN_CHARS]!r}, which is refused: a "
        "checkpoint may name only files inside its own directory (a relative path, no '..', no absolute path, "
        "no symlink leading out)")
    if not isinstance(name, str) or not name or "\0" in name:
        raise refusal
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise refusal
    root = os.path.realpath(checkpoint)
    real = os.path.realpath(checkpoint / relative)  # every symlink on the way followed
    if real == root or os.path.commonpath([root, real]) != root:
        raise refusal
    return checkpoint / relative


def refuse_links_leading_out(checkpoint: Path) -> None:
    """Every symlink inside `checkpoint` must resolve inside it, whatever names it: the readers also open
    fixed names (meta.json, state.pt, extra.pt, dcp/), which a crafted checkpoint could make links out.
    The walk follows no link, so nothing outside is opened or listed."""
    for root, dirs, names in os.walk(checkpoint):
        for name in dirs + names:
            path = Path(root) / name
            if path.is_symlink():
                relative = str(path.relative_to(checkpoint))
                try:
                    confined_path(checkpoint, relative, path)
                except CheckpointFileError:
                    raise CheckpointFileError(
                        f"checkpoint {checkpoint}: {relative[:_SHOWN_CHARS]!r} is a symlink leading out of the "
                        "checkpoint, which is refused: a checkpoint may hold only its own files") from None
