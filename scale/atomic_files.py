"""Files a reader finds whole, and the checksum that tells a whole file from an altered one.

A JSON file that is rewritten as a run goes (a shard manifest and journal, the demo's state, eval
results, a bench's progress) goes to `<name>.tmp`, is fsynced and renamed over the old one: a kill or a
power loss at any moment leaves the previous file or the new one, never half of either.

Shard manifests and checkpoints' meta.json record each file's sha256 (`sha256_of_file`), so a reader
can tell a truncated or altered file from the one that was written.

Their reader, `read_json` / `parse_json`, turns every way such a file can be damaged or hostile (not
a file, not UTF-8, not JSON, nested past the parser's depth, an integer past Python's digit limit)
into one `DamagedJson` whose message is the reason, for the caller's one-line error naming the file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, Optional

FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"))
_READ_BLOCK = 1 << 20  # shards and checkpoint files run to gigabytes: hash them a block at a time


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class DamagedJson(ValueError):
    """A JSON file or line that cannot be read or parsed; the message says why, without the path."""


def parse_json(text: str) -> Any:
    """`json.loads`, with every failure a DamagedJson."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DamagedJson(f"not JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise DamagedJson("not JSON a reader can take (nested too deeply)") from None
    except ValueError as err:  # an integer of more digits than int() converts
        raise DamagedJson(f"not JSON a reader can take ({err})") from None


def read_regular_file(path: Path) -> bytes:
    """The bytes of `path`, which must be a regular file (links followed): a device (/dev/zero) would
    read without end, a pipe would block. OSError otherwise, its strerror saying why."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO would block in a plain open
    with open(descriptor, "rb") as stream:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return stream.read()


def irregular_kind(path: Path) -> Optional[str]:
    """What `path` is when it is there (symlinks followed) but no regular file ("a directory", "a character
    device" ...); None for a regular file or nothing at all. Such a file is never read: /dev/zero reads
    without end (an empty tar to tarfile), a pipe blocks."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in FILE_KINDS if test(mode)), "not a file")


def read_json(path: Path) -> Any:
    """The parsed content of the JSON file `path`, with every failure a DamagedJson."""
    try:
        text = read_regular_file(path).decode("utf-8")
    except IsADirectoryError:
        raise DamagedJson("a folder, not a file") from None
    except OSError as err:
        raise DamagedJson(f"unreadable ({err.strerror or type(err).__name__})") from None
    except UnicodeDecodeError as err:
        raise DamagedJson(f"not UTF-8 text (byte {err.start})") from None
    return parse_json(text)


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
