"""Files a reader finds whole, and the checksum that tells a whole file from an altered one.

A JSON file that is rewritten as a run goes (a shard manifest and journal, the demo's state, eval
results, a bench's progress) goes to `<name>.tmp`, is fsynced and renamed over the old one: a kill or a
power loss at any moment leaves the previous file or the new one, never half of either.

Shard manifests and checkpoints' meta.json record each file's sha256 (`sha256_of_file`), so a reader
can tell a truncated or altered file from the one that was written.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

_READ_BLOCK = 1 << 20  # shards and checkpoint files run to gigabytes: hash them a block at a time


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomically(path: Path, content: Any, indent: int = 1,
                          default: Optional[Callable[[Any], Any]] = None) -> None:
    """Write `content` to a temp name beside `path`, fsync it and rename it over `path` (its folder is
    created): a reader, or a run killed mid-write, sees the previous file or the new one.

    `default` turns values JSON cannot hold into ones it can (json.dump's `default`)."""
    write_text_atomically(path, json.dumps(content, indent=indent, default=default) + "\n")


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to a temp name beside `path`, fsync it and rename it over `path` (its folder is
    created): a reader, or a run killed mid-write, sees the previous file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(path.name + ".tmp")
    with open(temp_path, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temp_path, path)
