"""Every JSON file or line scale reads back (shard indexes and manifests, checkpoints' meta.json, the
step logs, rollbacks.json, eval results, the demo's state) is read through one reader: a damaged or
hostile file is one line naming it, never a traceback or data silently dropped."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scale.atomic_files import DamagedJson, parse_json, read_json
from scale.checkpoint_io.directory import CheckpointError, read_meta
from scale.errors import UserError
from scale.shards.manifest import load_manifest
from scale.shards.shard_index import index_path, load_index
from scale.trainer.divergence import read_rollbacks
from scale.trainer.sample_record import SampleRecord
from scale.trainer.step_log import forget_steps_after, lines_up_to, open_for_appending

DEEP = "[" * 100_000 + "]" * 100_000  # past the parser's recursion limit
HOSTILE = {
    "nested too deeply": DEEP.encode(),
    "an integer of 5000 digits": b'{"step": ' + b"9" * 5000 + b"}",
    "not UTF-8": b'{"step": 1, "x": "\xff"}',
    "not JSON": b'{"step": ',
}


@pytest.mark.parametrize("content", list(HOSTILE.values()), ids=list(HOSTILE))
def test_every_damaged_file_is_one_damaged_json_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "file.json"
    path.write_bytes(content)
    with pytest.raises(DamagedJson) as caught:
        read_json(path)
    assert "\n" not in str(caught.value) and str(path) not in str(caught.value)


def test_a_folder_or_a_missing_file_is_a_damaged_json_error_too(tmp_path: Path) -> None:
    with pytest.raises(DamagedJson, match="a folder, not a file"):
        read_json(tmp_path)
    with pytest.raises(DamagedJson, match="unreadable"):
        read_json(tmp_path / "absent.json")
    assert parse_json('{"a": [1]}') == {"a": [1]}


@pytest.mark.parametrize("content", list(HOSTILE.values()), ids=list(HOSTILE))
def test_shard_index_manifest_and_meta_readers_name_the_file(tmp_path: Path, content: bytes) -> None:
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"\0" * 1024)
    index_path(shard).write_bytes(content)
    index, problem = load_index(shard)
    assert index is None and problem.startswith(f"unreadable index {index_path(shard)}: ")
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(content)
    assert load_manifest(manifest) == (None, load_manifest(manifest)[1]) and "unreadable manifest" in \
        load_manifest(manifest)[1]
    checkpoint = tmp_path / "step_00000001"
    checkpoint.mkdir()
    (checkpoint / "meta.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{checkpoint / 'meta.json'} is "):
        read_meta(checkpoint)
    rollbacks = tmp_path / "rollbacks.json"
    rollbacks.write_bytes(content)
    with pytest.raises(UserError, match="rollbacks.json: not a rollback record"):
        read_rollbacks(rollbacks)


# ----------------------------------------------------------------------------- the step logs

def _log(tmp_path: Path, *lines: bytes) -> Path:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(lines))
    return path


@pytest.mark.parametrize("separator", ["\x1c", "\x0b", "\x0c", "\x85", "\u2028"])
def test_a_character_that_str_splitlines_breaks_on_does_not_cut_the_log(tmp_path: Path, separator: str) -> None:
    # Text inside a line, not the end of one: the lines after it were once dropped silently as "cut short".
    path = _log(tmp_path, b'{"step": 1}\n', ('{"step": 2, "note": "a' + separator + 'b"}\n').encode(),
                b'{"step": 3}\n')
    if separator < " ":  # a raw control character inside a JSON string is not JSON: the line is refused
        with pytest.raises(UserError, match="line 2 is not a line of the metrics log"):
            lines_up_to(path, 3, "the metrics log")
    else:  # valid JSON text: every line kept
        assert len(lines_up_to(path, 3, "the metrics log")) == 3
    bare = _log(tmp_path, b'{"step": 1}\n', ('{"step": 2}' + separator + "\n").encode(), b'{"step": 3}\n')
    with pytest.raises(UserError, match="line 2 is not a line of the metrics log"):  # not JSON whitespace
        lines_up_to(bare, 3, "the metrics log")


@pytest.mark.parametrize("line", [DEEP.encode(), b'{"step": 1e400}', b'{"step": -1e400}', b'{"step": "2"}',
                                  b'{"step": 2.9}', b'{"step": true}', b'{"step": 2, "x": "\xff"}', b"[2]",
                                  b'{"step": ' + b"9" * 5000 + b"}"],
                         ids=["nested", "inf", "-inf", "string", "float", "bool", "not_utf8", "list", "5000_digits"])
def test_a_damaged_middle_line_is_one_user_error_naming_the_file_and_line(tmp_path: Path, line: bytes) -> None:
    path = _log(tmp_path, b'{"step": 1}\n', line + b"\n", b'{"step": 3}\n')
    before = path.read_bytes()
    with pytest.raises(UserError, match=rf"{path} line 2 is not a line of the metrics log"):
        forget_steps_after(path, 3, "the metrics log")
    assert path.read_bytes() == before  # nothing written is lost


def test_a_last_line_cut_short_is_still_dropped(tmp_path: Path) -> None:
    path = _log(tmp_path, b'{"step": 1}\n', b'{"step": 2}\n', b'{"step": 3, "lo')
    assert lines_up_to(path, 5, "the metrics log") == ['{"step": 1}\n', '{"step": 2}\n']
    assert lines_up_to(path, 1, "the metrics log") == ['{"step": 1}\n']


def test_a_log_that_is_a_folder_or_sits_under_a_file_is_one_user_error(tmp_path: Path) -> None:
    folder = tmp_path / "metrics.jsonl"
    folder.mkdir()
    with pytest.raises(UserError, match=f"{folder}: cannot read the metrics log"):
        forget_steps_after(folder, 3, "the metrics log")
    with pytest.raises(UserError, match=f"{folder}: cannot append to the metrics log"):
        open_for_appending(folder, "the metrics log")
    run = tmp_path / "run"
    run.mkdir()
    (run / "samples").write_text("not a folder")
    record = SampleRecord(run, 0)
    with pytest.raises(UserError, match=r"samples/rank_0.jsonl: cannot append to the sample record"):
        record.start(0, True, lambda: None)
    assert (run / "samples").read_text() == "not a folder"


def test_lines_are_appended_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "metrics.jsonl"
    with open_for_appending(path, "the metrics log") as out:
        out.write(json.dumps({"step": 1}) + "\n")
        assert path.read_text() == '{"step": 1}\n'  # line-buffered: a kill after the line loses nothing


@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_a_device_or_a_pipe_where_a_file_goes_is_refused_without_reading_it(tmp_path: Path, kind: str) -> None:
    # /dev/zero read without end (a MemoryError traceback); a FIFO would block the resume forever.
    def make(path: Path) -> Path:
        path.symlink_to("/dev/zero") if kind == "dev_zero" else os.mkfifo(path)
        return path

    with pytest.raises(DamagedJson, match="not a regular file"):
        read_json(make(tmp_path / "file.json"))
    log = make(tmp_path / "metrics.jsonl")
    with pytest.raises(UserError, match=f"{log}: cannot read the metrics log \\(not a regular file\\)"):
        forget_steps_after(log, 3, "the metrics log")
    with pytest.raises(UserError, match="rollbacks.json: not a rollback record"):
        read_rollbacks(make(tmp_path / "rollbacks.json"))
