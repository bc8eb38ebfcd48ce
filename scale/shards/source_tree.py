"""Listing the files of a source tree once each, whatever its symlinks do.

`os.walk(followlinks=True)` recurses until the path is too long on a symlink loop (a link to
an ancestor folder) and lists a folder's files twice when two links, or a link and the real
path, lead to it. `walk_files` follows symlinked folders as well (subsets of a data set are
often built from symlinked class folders), but:

* it enters each real folder (device, inode) at most once, and lists each real file (device,
  inode: symlinks and hard links to one file are one file) at most once;
* of several paths to one folder or file, the one reached without symlinks wins (real folders
  are walked before any symlinked one), then the one found first; walking is in sorted order,
  so the result depends only on the tree;
* every path it leaves out comes back with the reason, for the caller to report, including a
  symlink that cannot be resolved at all (a loop of file links, a.jpg -> b.jpg -> a.jpg: ELOOP).

It imports nothing heavy, so both the converter (scale.shards.imagefolder) and the training loader
(scale.data.image_folder) list image folders with it.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

LeftOut = tuple[str, str]  # (path relative to the root, why it is left out)


def unresolvable_reason(err: OSError) -> str:
    """Why an entry whose type cannot be read (`DirEntry.is_dir()` raised) is left out."""
    if err.errno == errno.ELOOP:
        return "a symlink loop (too many levels of symbolic links)"
    return f"unreadable: {err.strerror or err}"


def _folder_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def walk_files(root: Path, folders: Sequence[str]) -> tuple[list[str], list[LeftOut]]:
    """Files under `root/<folder>` for each of `folders` (names of root's sub-folders), as sorted
    paths relative to `root` with forward slashes, and the paths left out with their reasons."""
    seen_folders: dict[tuple[int, int], str] = {_folder_id(root): "the top folder itself"}
    files: list[tuple[str, tuple[int, int] | None, bool]] = []  # (path, file id, reached via a symlink)
    left_out: list[LeftOut] = []
    linked = [name for name in folders if (root / name).is_symlink()]
    pending_links = list(linked)  # walked after every real folder, in the order found

    def walk(top: str, via_link: bool) -> None:
        stack = [top]
        while stack:
            rel = stack.pop()
            try:
                folder_id = _folder_id(root / rel)
                if folder_id in seen_folders:
                    left_out.append((rel, f"a link to a folder already listed ({seen_folders[folder_id]})"))
                    continue
                seen_folders[folder_id] = rel
                entries = sorted(os.scandir(root / rel), key=lambda entry: entry.name)
            except OSError as err:
                left_out.append((rel, f"unreadable folder: {err.strerror or err}"))
                continue
            subfolders = []
            for entry in entries:
                child = f"{rel}/{entry.name}"
                try:
                    is_folder = entry.is_dir()  # follows symlinks; False for a dangling one
                except OSError as err:  # a loop of links (ELOOP), which no stat can resolve
                    left_out.append((child, unresolvable_reason(err)))
                    continue
                if is_folder:
                    (pending_links.append if entry.is_symlink() else subfolders.append)(child)
                elif entry.is_symlink():
                    try:
                        target = os.stat(entry.path)
                        files.append((child, (target.st_dev, target.st_ino), True))
                    except OSError:  # dangling: kept, so that the caller reports it as unreadable
                        files.append((child, None, True))
                else:  # a plain entry: its own inode, on its folder's device (mount points are folders)
                    files.append((child, (folder_id[0], entry.inode()), via_link))
            stack.extend(reversed(subfolders))

    for name in folders:
        if name not in linked:
            walk(name, via_link=False)
    while pending_links:
        walk(pending_links.pop(0), via_link=True)

    kept: dict[tuple[int, int], str] = {}
    listed: list[str] = []
    # Real paths first, then sorted: which duplicate is kept depends only on the tree.
    for rel, file_id, via_link in sorted(files, key=lambda item: (item[2], item[0])):
        if file_id is not None and file_id in kept:
            left_out.append((rel, f"same file as {kept[file_id]} (a symlink or hard link)"))
            continue
        if file_id is not None:
            kept[file_id] = rel
        listed.append(rel)
    return sorted(listed), sorted(left_out)
