"""Atomic, durable, rotating checkpoints that fail over to the previous one.

A checkpoint is a directory `step_00000100/`. It is written as `step_00000100.tmp/`;
every file and directory in it is fsynced, `meta.json` records each file's size and
sha256, and only then is it renamed into place (and the parent fsynced). A run killed at
any moment (SIGKILL, power loss) therefore leaves every earlier checkpoint intact, and a
half-written one is ignored and cleaned up. Directories (not single files) let sharded
engines (FSDP's torch.distributed.checkpoint, DeepSpeed) write many files under the same
rules.

`--resume auto` verifies the newest checkpoint against its recorded sizes and checksums
before loading it; a truncated or corrupt one is named in a warning and the previous one
is used, and when the run reaches that step again the damaged checkpoint is replaced by a
good one. A disk that fills up while saving is one clear error: the partial `.tmp` is
removed and the previous checkpoint stays usable.

meta.json is data from whoever wrote the checkpoint: every reader (resume, export, eval)
takes it through `read_meta`, which checks its schema, and the file names it records are
followed only inside the checkpoint (confined.py). Rotation renames an
old checkpoint to `step_*.deleting` before removing it, so a kill mid-removal leaves
nothing that looks like a checkpoint, and later saves clear such leftovers.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ..atomic_files import DamagedJson, read_json, sha256_of_file
from ..errors import UserError
from .confined import confined_path, refuse_links_leading_out
from .errors import CheckpointError

_COMPLETE = re.compile(r"^step_(\d{8})$")
META = "meta.json"
FILES_KEY = "files"  # meta.json: {relative path: {"bytes": n, "sha256": hex}}
CONFIG_KEY = "config"  # meta.json: the run config (to_dict form) a resume is checked against
DATA_ORDER_KEY = "data_order"  # meta.json: the data order of the run that wrote it (PretrainData.order)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Directories rotation and re-saving leave behind while they work (cleared by later saves).
_LEFTOVER_SUFFIXES = (".tmp", ".deleting", ".replaced")
# Below this much free space a failed write is reported as a full disk: torch.save's zip
# writer turns ENOSPC into a RuntimeError without an errno.
_FULL_DISK_BYTES = 16 << 20


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_directory(directory: Path) -> Dict[str, Dict[str, object]]:
    """fsync every file and directory under `directory`; return {relative path: size, sha256}."""
    files: Dict[str, Dict[str, object]] = {}
    for root, dirs, names in os.walk(directory):
        for name in sorted(names):
            path = Path(root) / name
            _fsync_path(path)
            files[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": sha256_of_file(path)}
        _fsync_path(Path(root))
    return files


def verify_directory(directory: Path, files: Dict[str, Dict[str, object]]) -> Optional[str]:
    """None when every recorded file is there with its size and checksum; else what is wrong.

    Every name is confined to `directory` before any file is looked at: a name leading out is
    refused without opening, stat'ing or hashing anything outside (no oracle on other files)."""
    try:
        paths = {name: confined_path(directory, name, directory / META) for name in files}
    except UserError as err:
        return str(err)
    for name, record in sorted(files.items()):
        path = paths[name]
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != record.get("bytes"):
            return f"{path} is truncated or altered ({size} bytes, {record.get('bytes')} written)"
        if sha256_of_file(path) != record.get("sha256"):
            return f"{path} is corrupt (sha256 differs from the one recorded when it was written)"
    return None


def is_disk_full(err: BaseException, directory: Path) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(err):
        return True
    try:
        return shutil.disk_usage(directory).free < _FULL_DISK_BYTES
    except OSError:
        return False


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}"

    def complete(self) -> List[Path]:
        """Complete checkpoints (renamed into place), oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir()
                 if p.is_dir() and _COMPLETE.match(p.name) and (p / META).is_file()]
        return sorted(found, key=lambda p: int(_COMPLETE.match(p.name).group(1)))

    def latest(self) -> Optional[Path]:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, write: Callable[[Path], None], meta: dict, is_writer: bool = True,
             barrier: Callable[[], None] = lambda: None) -> Path:
        """Write checkpoint `step`: `write(tmp_dir)` fills it (on every rank, for sharded
        engines), then the writer rank seals it (fsync + checksums in meta.json) and renames
        it into place.

        A checkpoint already there for `step` is replaced: a run only reaches a step it saved
        before after `--resume auto` fell back over it, because it was damaged."""
        final = self.path_for(step)
        tmp = self.directory / f"{final.name}.tmp"
        try:
            if is_writer:
                self.directory.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            barrier()
            write(tmp)
            barrier()
            if is_writer:
                files = seal_directory(tmp)
                with open(tmp / META, "w") as f:
                    json.dump({"step": step, **meta, FILES_KEY: files}, f, indent=2)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_path(tmp)
                self._publish(tmp, final)
                self._prune()
        except Exception as err:
            if not is_disk_full(err, self.directory):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest()
            raise CheckpointError(
                f"checkpoint {final}: the disk is full (no space left on device under {self.directory}); "
                f"the partial checkpoint was removed and "
                + (f"{previous} is intact: free space, then resume with --resume auto"
                   if previous else "no earlier checkpoint exists: free space and restart")) from err
        barrier()
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the sealed `tmp` to `final`; one already there (damaged, fallen back over) is first
        renamed aside to `<final>.replaced`, so a kill in between leaves the earlier checkpoints."""
        if final.exists():
            replaced = final.with_name(final.name + ".replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(tmp, final)
        _fsync_path(self.directory)

    def _prune(self) -> None:
        """Remove checkpoints beyond keep_last, and what earlier saves left half done."""
        done = self.complete()
        for old in done[:-self.keep_last]:
            self._remove(old)
        # A `step_*` without meta.json older than the newest complete one is a removal a kill
        # interrupted (before rotation renamed first); a newer one may still be being written.
        newest = int(_COMPLETE.match(done[-1].name).group(1)) if done else -1
        for path in self.directory.glob("step_*"):
            match = _COMPLETE.match(path.name)
            if path.name.endswith(_LEFTOVER_SUFFIXES) or (match and int(match.group(1)) < newest
                                                         and not (path / META).is_file()):
                self._remove(path)

    def _remove(self, path: Path) -> None:
        """Rename out of the `step_XXXXXXXX` namespace, then delete: a kill mid-way leaves a `.deleting`
        directory that the next save clears, never a checkpoint-looking one."""
        doomed = path if path.name.endswith(_LEFTOVER_SUFFIXES) else path.with_name(path.name + ".deleting")
        if doomed != path:
            shutil.rmtree(doomed, ignore_errors=True)
            try:
                os.rename(path, doomed)
            except OSError:  # cannot rename (permissions): remove in place, as rotation always did
                doomed = path
        shutil.rmtree(doomed, ignore_errors=True)

    def verify(self, path: Path) -> Optional[str]:
        """None when `path` is complete and intact; else why it is not."""
        try:
            meta = read_meta(path)
        except CheckpointError as err:
            return str(err)
        return verify_directory(path, meta[FILES_KEY])

    def _linked_in(self, path: Path) -> Optional[str]:
        """Why `path` is not this run's own checkpoint when it is a link to a folder elsewhere (another run's
        checkpoint linked in would be taken for this run's progress), else None."""
        if path.is_symlink() and path.resolve().parent != self.directory.resolve():
            return (f"a link to {path.resolve()}, a checkpoint outside this run's {self.directory.name}/; "
                    "resume from it by its path if that is meant")
        return None

    def newest_usable(self, warn: Callable[[str], None]) -> Optional[Path]:
        """The newest complete checkpoint that verifies, warning about each newer one skipped.

        None when there is none at all; CheckpointError (the one line, no warnings) when every one is damaged.
        """
        candidates = self.complete()
        problems: List[Tuple[Path, str]] = []
        for path in reversed(candidates):
            problem = self._linked_in(path) or self.verify(path)
            if problem is None:
                for skipped, why in problems:
                    warn(f"checkpoint {skipped} is not usable: {why}; falling back to {path.name}")
                return path
            problems.append((path, problem))
        if problems:
            raise CheckpointError("no usable checkpoint for --resume auto: "
                                  + "; ".join(f"{p.name}: {why}" for p, why in problems)
                                  + " (start afresh without --resume, or restore a good copy)")
        return None

    def resolve(self, resume: str, warn: Callable[[str], None] = lambda _msg: None) -> Optional[Path]:
        """`auto` -> newest usable checkpoint (None if there is none); a path -> that checkpoint, verified."""
        if not resume:
            return None
        if resume == "auto":
            return self.newest_usable(warn)
        path = Path(resume)
        if not (path / META).is_file():
            raise CheckpointError(f"train.resume={resume!r} is not a complete checkpoint directory "
                                  f"(no {META} inside); pass a checkpoints/step_XXXXXXXX directory or 'auto'")
        problem = self.verify(path)
        if problem is not None:
            raise CheckpointError(f"train.resume={resume!r} is not usable: {problem}")
        return path


def _is_count(value: object, least: int = 0) -> bool:
    return type(value) is int and value >= least


# meta.json's keys: whether each must be there, what it must hold (in words), and the check.
_META_SCHEMA: Tuple[Tuple[str, bool, str, Callable[[object], bool]], ...] = (
    ("step", True, "an integer >= 0", _is_count),
    (FILES_KEY, True, "a mapping of relative file names to {\"bytes\": integer >= 0, \"sha256\": 64 hex digits}",
     lambda files: isinstance(files, dict) and all(
         isinstance(name, str) and isinstance(record, dict) and _is_count(record.get("bytes"))
         and isinstance(record.get("sha256"), str) and _SHA256.match(record["sha256"]) is not None
         for name, record in files.items())),
    (CONFIG_KEY, False, "a mapping (the run config)", lambda config: isinstance(config, dict)),
    ("epoch", False, "an integer >= 0", _is_count),
    ("world_size", False, "an integer >= 1", lambda n: _is_count(n, 1)),
    ("engine", False, "a string", lambda name: isinstance(name, str)),
    ("checkpoint_format", False, "a string", lambda name: isinstance(name, str)),
    ("model", False, "a string", lambda name: isinstance(name, str)),
    # PretrainData.order of the run that wrote it; checkpoints written before it was recorded lack it.
    (DATA_ORDER_KEY, False, "a string (the data order)", lambda name: isinstance(name, str)),
)


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json, checked against its schema (_META_SCHEMA), or one CheckpointError naming it.

    What every reader takes meta.json through: resume, verification, export and eval."""
    meta_file = path / META
    try:
        refuse_links_leading_out(path)
    except UserError as err:
        raise CheckpointError(str(err)) from None
    try:
        meta = read_json(meta_file)
    except DamagedJson as err:
        raise CheckpointError(f"{meta_file} is {err}; not a scale checkpoint?") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file} is not a JSON object; not a scale checkpoint?")
    for key, required, allowed, fits in _META_SCHEMA:
        if key not in meta and not required:
            continue
        if key not in meta or not fits(meta[key]):
            found = "missing" if key not in meta else f"{type(meta[key]).__name__} {json.dumps(meta[key])[:80]}"
            raise CheckpointError(f"{meta_file}: '{key}' must be {allowed} (found: {found}); damaged or edited, "
                                  "not a checkpoint this code wrote")
    # `--resume auto` picks the newest checkpoint by its folder's name: a folder renamed, or linked in from
    # another run, under a later step's name would be taken for that step (and the steps after its own redone).
    named = _COMPLETE.match(path.name)
    if named and int(named.group(1)) != meta["step"]:
        raise CheckpointError(f"{meta_file}: 'step' is {meta['step']} but its folder is named {path.name}; renamed, "
                              "linked from another run or edited: resume from the folder of its own step "
                              f"(step_{meta['step']:08d}), by its path")
    return meta
