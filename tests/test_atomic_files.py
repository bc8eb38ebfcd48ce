"""scale/atomic_files.py: one way to write a JSON file whole (fsynced, then renamed over the old one)
and one way to hash a file, used by shards, checkpoints, the demo, scale.eval and the benches."""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from scale import demo
from scale.shards.manifest import write_manifest

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "scale/atomic_files.py"


def calls(tree: ast.AST):
    """(`json.dump`, `os.replace`, `.replace` (a method), ..., the call) for every call under `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            yield f"{owner}.{node.func.attr}", node


def writes_json_and_renames(function: ast.AST) -> bool:
    """A function that writes JSON to a file (json.dump, or json.dumps handed to .write / .write_text) and
    renames a file into place (os.replace / os.rename, or Path.replace: one argument, str.replace takes two)."""
    found = list(calls(function))
    writes_json = any(name == "json.dump" or (name.endswith((".write", ".write_text")) and any(
        inner == "json.dumps" for argument in call.args for inner, _ in calls(argument)))
        for name, call in found)
    renames = any(name in ("os.replace", "os.rename") or (name.endswith(".replace") and len(call.args) == 1)
                  for name, call in found)
    return writes_json and renames


def test_json_is_written_atomically_in_one_place():
    """The shard manifest, the demo's state, eval results and the benches' files had four copies of
    "write to .tmp, rename", only one of which fsynced: now each calls scale/atomic_files.py."""
    copies = []
    for path in sorted([*(REPO / "scale").rglob("*.py"), *(REPO / "bench").rglob("*.py")]):
        if path == HELPER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and writes_json_and_renames(node):
                copies.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not copies


@pytest.fixture
def disk_events(monkeypatch):
    """('fsync', file) and ('replace', source, target) in the order they happen."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target, *args, **kwargs):
        events.append(("replace", os.path.realpath(source), os.path.realpath(target)))
        real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.parametrize("writer", ["shard manifest", "demo state"])
def test_json_state_files_are_on_disk_before_they_replace_the_old_one(tmp_path, disk_events, writer):
    """After a power loss the file is the previous one or the new one, whole: the new content is fsynced
    before the rename (the demo's state was renamed unsynced, so it could come back empty)."""
    if writer == "shard manifest":
        target = write_manifest(tmp_path, {"format": "scale-wds-v1", "shards": []})
    else:
        demo.write_demo_state(tmp_path, {"steps": 3}, finished=True)
        target = tmp_path / demo.DEMO_STATE
    replaced = [event for event in disk_events if event[0] == "replace" and event[2] == str(target.resolve())]
    assert len(replaced) == 1, disk_events
    source = replaced[0][1]
    assert ("fsync", source) in disk_events[:disk_events.index(replaced[0])], disk_events
    assert json.loads(target.read_text())  # and it reads back
