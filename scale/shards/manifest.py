"""The `manifest.json` that describes one converted shard set (format "scale-wds-v1").

Schema (the WebDataset loader reads it, so keep it stable)::

    {"format": "scale-wds-v1", "split": "train", "total_samples": 1234,
     "shards": [{"name": "train-000000.tar", "num_samples": 1000, "sha256": "<hex>"}, ...],
     "classes": {"class_name": 0, ...}, "options": {...the options used...},
     "skipped": [{"path": "...", "reason": "..."}]}

`manifest_problem` is the one check of this schema: the verifier uses all of it, the loader
(scale/data/wds_stream.py) only what reading the shards needs (format, names, sample counts). A shard's
name is a plain file name in the manifest's folder: one that leads elsewhere ('../x.tar', '/abs/x.tar',
'sub/x.tar') would have the loader read, and `scale-verify-shards --index` write, outside the folder.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..atomic_files import DamagedJson, read_json, write_json_atomically
from . import DataPrepError

MANIFEST_FORMAT = "scale-wds-v1"
MANIFEST_NAME = "manifest.json"
# The split names a file, so it must not carry path separators or odd characters.
SPLIT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_name_pattern(split: str) -> re.Pattern[str]:
    """Matches this split's shard names, complete (`.tar`) or in progress (`.tar.tmp`), and their
    member-offset indexes (`.tar.idx.json`, scale/shards/shard_index.py)."""
    return re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar(\.idx\.json)?(\.tmp)?$")


def build_manifest(
    split: str,
    shards: list[dict[str, Any]],
    classes: dict[str, int],
    options: dict[str, Any],
    skipped: list[dict[str, str]],
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "split": split,
        "total_samples": sum(shard["num_samples"] for shard in shards),
        "shards": [
            {"name": shard["name"], "num_samples": shard["num_samples"], "sha256": shard["sha256"]}
            for shard in shards
        ],
        "classes": classes,
        "options": options,
        "skipped": [{"path": entry["path"], "reason": entry["reason"]} for entry in skipped],
    }


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    path = out_dir / MANIFEST_NAME
    write_json_atomically(path, manifest)
    return path


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_plain_file_name(name: str) -> bool:
    """Whether `name` names a file directly inside a folder: a manifest's shards must, so that reading
    or indexing them (NAME.tar.idx.json) never reaches outside the shard folder."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def manifest_problem(manifest: Any, complete: bool = True) -> str | None:
    """What makes a parsed manifest unusable, or None. `complete=False` checks only what a reader of
    the shards needs (format, and each shard's name and sample count), for hand-written manifests."""
    if not isinstance(manifest, dict):
        return f"not a {MANIFEST_FORMAT} manifest (a JSON {type(manifest).__name__}, not an object)"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"not a {MANIFEST_FORMAT} manifest (format {manifest.get('format')!r})"
    shards = manifest.get("shards")
    fields = "{name, num_samples, sha256}" if complete else "{name, num_samples}"
    expected = f"'shards' must be a list of {fields} with num_samples an integer >= 0"
    if not isinstance(shards, list):
        return expected
    names: set[str] = set()
    for position, shard in enumerate(shards):
        if not (isinstance(shard, dict) and isinstance(shard.get("name"), str)
                and _is_count(shard.get("num_samples"))
                and (not complete or isinstance(shard.get("sha256"), str))):
            return f"{expected}; shard {position} is {json.dumps(shard)[:200]}"
        if not is_plain_file_name(shard["name"]):
            return (f"shard {position}'s name {json.dumps(shard['name'])[:200]} is not a plain file name; expected "
                    "the name of a file in the manifest's folder (no '/', '\\' or NUL; not empty, '.' or '..')")
        if shard["name"] in names:
            return f"shard {shard['name']!r} is listed twice"
        names.add(shard["name"])
    if complete and not _is_count(manifest.get("total_samples")):
        return "'total_samples' must be an integer >= 0"
    if complete and not isinstance(manifest.get("classes"), dict):
        return "'classes' must be an object of class name -> index"
    return None


def load_manifest(path: Path, complete: bool = True) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None), or (None, what is wrong) when `path` cannot be read, parsed or used."""
    try:
        manifest = read_json(path)
    except DamagedJson as err:
        return None, f"unreadable manifest: {err}"
    problem = manifest_problem(manifest, complete)
    return (None, problem) if problem else (manifest, None)


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """Load and sanity-check `out_dir/manifest.json`; DataPrepError names what is wrong."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataPrepError(f"{path}: no manifest (is {out_dir} a converted shard folder?)")
    manifest, problem = load_manifest(path)
    if manifest is None:
        raise DataPrepError(f"{path}: {problem}")
    return manifest
