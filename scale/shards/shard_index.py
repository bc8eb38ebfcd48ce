"""The member-offset index of one tar shard: `NAME.tar.idx.json` next to `NAME.tar` ("scale-wds-index-v1").

With it, sample i of a shard is one positioned read: bytes [offsets[i], offsets[i] + sizes[i]) of the
tar hold that sample's members, headers and padded data, so a loader can read the samples of a shard
set in any order (scale/data/indexed_shards.py) instead of streaming whole shards. The converters
write it as they write each shard (they know the offsets); `scale-verify-shards --index` builds it for
shards written elsewhere (webdataset's TarWriter, plain tar) by reading their headers.

    {"format": "scale-wds-index-v1", "shard_bytes": 1034240,
     "keys": ["000000017", ...], "offsets": [0, ...], "sizes": [3584, ...]}

`shard_bytes` is the tar's size when the index was made: an index whose shard has another size is
stale. An index is read like any file from the user: `index_problem` checks all of it (types, every
span inside the tar, on a 512-byte block, in order and not overlapping) before an offset is used.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..atomic_files import DamagedJson, read_json, write_json_atomically

INDEX_FORMAT = "scale-wds-index-v1"
INDEX_SUFFIX = ".idx.json"
BLOCK = tarfile.BLOCKSIZE  # tar headers start on 512-byte blocks, so does every sample's span
ZERO_BLOCK = bytes(BLOCK)  # two of them end a tar
DIRECTORY = tarfile.DIRTYPE
PAX_HEADER = tarfile.XHDTYPE  # extended records for the member after it
POSIX_MAGIC = tarfile.POSIX_MAGIC  # b"ustar\0" "00"; GNU's is b"ustar  \0"
PLAIN_KINDS = (tarfile.REGTYPE, tarfile.AREGTYPE, DIRECTORY)  # a file ("0", or NUL in old tars), a folder


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name + INDEX_SUFFIX)


def split_member_name(name: str) -> Tuple[str, str]:
    """WebDataset's rule: the key runs up to the first dot of the file's base name."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, extension if dot else ""


@dataclass
class ShardIndex:
    """Per sample of one shard: its key and the byte span of its members."""

    shard_bytes: int
    keys: List[str]
    offsets: List[int]
    sizes: List[int]

    def to_json(self) -> dict:
        return {"format": INDEX_FORMAT, "shard_bytes": self.shard_bytes, "keys": self.keys,
                "offsets": self.offsets, "sizes": self.sizes}


def write_index(shard: Path, index: ShardIndex) -> Path:
    path = index_path(shard)
    write_json_atomically(path, index.to_json(), indent=0)
    return path


def scan_index(shard: Path) -> ShardIndex:
    """The index of a tar written by any tool, from its headers (data is skipped, not read).

    Samples are runs of consecutive regular members sharing a key, as webdataset groups them;
    members named `__...` are left out, as the loaders leave them out. Raises OSError or
    tarfile.TarError for a file that is no readable tar.
    """
    index = ShardIndex(shard.stat().st_size, [], [], [])
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            if not member.isreg() or Path(member.name).name.startswith("__"):
                continue
            key, _ = split_member_name(member.name)
            end = member.offset_data + -(-member.size // BLOCK) * BLOCK
            if not index.keys or key != index.keys[-1]:
                index.keys.append(key)
                index.offsets.append(member.offset)  # the first header of the member (long-name headers included)
                index.sizes.append(0)
            index.sizes[-1] = end - index.offsets[-1]
    return index


def span_members(span: bytes) -> List[Tuple[str, bytes]]:
    """(name, data) of each regular file in `span`, the bytes of one indexed sample (whole tar blocks).

    Plain ustar / GNU headers and pax extended headers (webdataset's TarWriter writes one before every
    member) are read here directly: tarfile.open per sample costs about 130 us, a few percent of a
    sample's decode. Anything else (pax global headers, GNU long names, links, sparse files, a base-256
    size, a header whose checksum does not add up) goes through tarfile, which reads every format it
    knows and raises tarfile.TarError for what is no tar."""
    members, position, extended = [], 0, {}
    while position + BLOCK <= len(span):
        header = span[position:position + BLOCK]
        if header == ZERO_BLOCK:
            break
        kind = header[156:157]
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            checksum = int(header[148:156].split(b"\0", 1)[0].strip(), 8)
        except ValueError:
            return _tarfile_members(span)
        if kind != PAX_HEADER and "size" in extended:
            size = extended["size"]
        data_end = position + BLOCK + size
        if (kind not in PLAIN_KINDS + (PAX_HEADER,) or data_end > len(span)
                or sum(header[:148]) + 8 * ord(" ") + sum(header[156:]) != checksum):
            return _tarfile_members(span)
        if kind == PAX_HEADER:  # records for the next member: its path and size are what matter here
            extended = _pax_records(span[position + BLOCK:data_end])
            if extended is None:
                return _tarfile_members(span)
        else:
            name = header[:100].split(b"\0", 1)[0]
            if header[257:265] == POSIX_MAGIC and header[345] != 0:  # ustar's prefix: a long path's folders
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name  # (GNU keeps other fields there)
            path = extended.get("path") or name.decode("utf-8", "surrogateescape")
            if kind != DIRECTORY and not path.endswith("/"):  # old tars mark a folder by its trailing slash
                members.append((path, span[position + BLOCK:data_end]))
            extended = {}
        position += BLOCK + -(-size // BLOCK) * BLOCK
    return members


def _pax_records(data: bytes) -> Optional[dict]:
    """The "LENGTH KEY=VALUE\\n" records of a pax header as {key: value} (size as an int), or None for
    anything span_members leaves to tarfile (a record that does not parse, a sparse file)."""
    records, position = {}, 0
    while position < len(data) and data[position] != 0:
        length_text, space, _ = data[position:position + 20].partition(b" ")
        if not space or not length_text.isdigit():
            return None
        record = data[position:position + int(length_text)]
        key, equals, value = record[len(length_text) + 1:-1].partition(b"=")
        if not equals or not record.endswith(b"\n") or key.startswith(b"GNU.sparse"):
            return None
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += int(length_text)
    if "size" in records:
        if not records["size"].isdigit():
            return None
        records["size"] = int(records["size"])
    return records


def _tarfile_members(span: bytes) -> List[Tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(span), mode="r:") as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar if member.isreg()]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def index_problem(content: Any, shard_bytes: int) -> Optional[str]:
    """What makes a parsed index unusable for a shard of `shard_bytes` bytes, or None."""
    if not isinstance(content, dict) or content.get("format") != INDEX_FORMAT:
        what = content.get("format") if isinstance(content, dict) else f"a JSON {type(content).__name__}"
        return f"not a {INDEX_FORMAT} index (format {what!r})"
    if content.get("shard_bytes") != shard_bytes:
        return (f"stale: made for a shard of {content.get('shard_bytes')!r} bytes, the shard has {shard_bytes}")
    keys, offsets, sizes = content.get("keys"), content.get("offsets"), content.get("sizes")
    if not (isinstance(keys, list) and isinstance(offsets, list) and isinstance(sizes, list)
            and len(keys) == len(offsets) == len(sizes)):
        return "'keys', 'offsets' and 'sizes' must be lists of one length"
    end_of_previous = 0
    for i, (key, offset, size) in enumerate(zip(keys, offsets, sizes)):
        if not (isinstance(key, str) and _is_int(offset) and _is_int(size)):
            got = json.dumps([key, offset, size])[:200]
            return f"sample {i}: key must be a string, offset and size integers, got {got}"
        if offset < end_of_previous or offset % BLOCK or size < BLOCK:
            return (f"sample {i}: offset {offset} must be a multiple of {BLOCK} at or after the end of sample "
                    f"{i - 1} ({end_of_previous}), size {size} at least {BLOCK}")
        if offset + size > shard_bytes:
            return (f"sample {i}: its members (bytes {offset}..{offset + size}) end outside the shard "
                    f"({shard_bytes} bytes)")
        end_of_previous = offset + size
    return None


def load_index(shard: Path) -> Tuple[Optional[ShardIndex], Optional[str]]:
    """(index, None), or (None, what is wrong) when the shard's index cannot be read or used."""
    path = index_path(shard)
    try:
        shard_bytes = shard.stat().st_size
    except OSError as err:  # its strerror, without the path the message names already
        return None, f"unreadable shard {shard}: {err.strerror or err}"
    try:
        content = read_json(path)
    except DamagedJson as err:
        return None, f"unreadable index {path}: {err}"
    problem = index_problem(content, shard_bytes)
    if problem:
        return None, f"index {path}: {problem}"
    return ShardIndex(shard_bytes, content["keys"], content["offsets"], content["sizes"]), None
