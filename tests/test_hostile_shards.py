"""Shard folders built to mislead: manifest shard names that reach outside the folder, an index whose spans
are off, shards that are devices, folders or links to them, folders without a sample. The verifier and the
loader refuse each, naming the file, and write nothing outside the shard folder."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Dict, List

import pytest

from scale.atomic_files import sha256_of_file
from scale.config import DataConfig
from scale.data import build_dataset
from scale.errors import UserError, one_line
from scale.shards import verify
from scale.shards.shard_index import index_path
from test_webdataset_loader import write_shards

IMG = 16
DEV_ZERO = Path("/dev/zero")
needs_dev_zero = pytest.mark.skipif(not DEV_ZERO.is_char_device(), reason="needs /dev/zero")


def files_under(root: Path) -> Dict[str, bytes]:
    """Every file below `root` (links not followed) and its bytes: what a command may not change."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and not path.is_symlink()}


def rewrite_manifest(directory: Path, names: List[str]) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    for shard, name in zip(manifest["shards"], names):
        shard["name"] = name
    (directory / "manifest.json").write_text(json.dumps(manifest))


def verifiable_shards(directory: Path, sizes=(3, 2)) -> Path:
    """`write_shards`' shards with a manifest the verifier passes (real checksums, a class per sample)."""
    paths = write_shards(directory, sizes)
    manifest = json.loads((directory / "manifest.json").read_text())
    for shard, path in zip(manifest["shards"], paths):
        shard["sha256"] = sha256_of_file(path)
    manifest["classes"] = {f"class{i}": i for i in range(sum(sizes))}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def run_verify(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, List[str]]:
    status = verify.main([*args, "--workers", "1"])
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def build(root: Path):
    return build_dataset(DataConfig(name="webdataset", root=str(root), num_workers=0, shuffle_buffer=4), IMG, 3, True)


# ----------------------------------------------------------------------------- B3: shard names outside the folder

def hostile_folder(tmp_path: Path, name: str) -> Path:
    """DIR with a one-shard manifest naming `name` ("{outside}" stands for an absolute path outside DIR),
    and a real tar wherever the name leads, so that only the name's form can stop reading or indexing it."""
    shards = tmp_path / "DIR"
    write_shards(shards, (2,))
    write_shards(tmp_path, (2,), prefix="outside", manifest=False)  # tmp_path/outside-000000.tar
    (tmp_path / "outside.tar").write_bytes((tmp_path / "outside-000000.tar").read_bytes())
    (shards / "sub").mkdir()
    (shards / "sub" / "x.tar").write_bytes((shards / "train-000000.tar").read_bytes())
    rewrite_manifest(shards, [name.replace("{outside}", str(tmp_path / "outside.tar"))])
    return shards


HOSTILE_NAMES = ["../outside.tar", "{outside}", "sub/x.tar", "sub\\x.tar", "", ".", ".."]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_the_verifier_refuses_manifest_shard_names_that_are_not_plain_file_names(
        tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    shards = hostile_folder(tmp_path, name)
    before = files_under(tmp_path)
    for args in (["--index"], []):  # writing the indexes, and verifying
        status, err = run_verify(capsys, str(shards), *args)
        assert status == 2, (args, err)
        assert len(err) == 1 and "manifest.json" in err[0] and "not a plain file name" in err[0], err
        assert "Traceback" not in err[0]
    assert files_under(tmp_path) == before  # no index written, inside the folder or outside it


@pytest.mark.parametrize("name", ["../outside.tar", "{outside}", "sub/x.tar"])
def test_the_loader_refuses_manifest_shard_names_that_are_not_plain_file_names(tmp_path: Path, name: str) -> None:
    shards = hostile_folder(tmp_path, name)
    with pytest.raises(UserError) as raised:
        build(shards)
    message = one_line(raised.value)
    assert str(shards / "manifest.json") in message and "not a plain file name" in message
    assert "\n" not in message


# ----------------------------------------------------------------------------- C1: an index with wrong spans

def test_the_verifier_compares_the_indexes_spans_with_the_tar(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shards = verifiable_shards(tmp_path / "DIR")
    assert run_verify(capsys, str(shards), "--index")[0] == 0
    assert run_verify(capsys, str(shards))[0] == 0
    index_file = index_path(shards / "train-000000.tar")
    index = json.loads(index_file.read_text())
    index["offsets"] = [offset + 512 for offset in index["offsets"]]  # still in order, on blocks, in the tar
    index["sizes"] = [size - 512 for size in index["sizes"]]
    index_file.write_text(json.dumps(index))
    status, err = run_verify(capsys, str(shards))
    assert status == 1
    [fail] = [line for line in err if line.startswith("FAIL")]
    assert "train-000000.tar.idx.json" in fail and f"rebuild it with scale-verify-shards --index {shards}" in fail


# ----------------------------------------------------------------------------- C5, E3: not regular files, no samples

@needs_dev_zero
def test_index_refuses_shards_that_are_not_regular_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shards = tmp_path / "DIR"
    write_shards(shards, (2,), manifest=False)
    (shards / "train-000001.tar").symlink_to(DEV_ZERO)
    (shards / "train-000002.tar").mkdir()
    status, err = run_verify(capsys, str(shards), "--index")
    assert status == 1
    fails = [line for line in err if line.startswith("FAIL")]
    assert len(fails) == 2 and all("not a regular file" in line for line in fails)
    assert "train-000001.tar" in fails[0] and "a character device" in fails[0]
    assert "train-000002.tar" in fails[1] and "a directory" in fails[1]
    assert not index_path(shards / "train-000001.tar").exists()


@needs_dev_zero
def test_verify_names_a_device_or_folder_shard_not_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shards = verifiable_shards(tmp_path / "DIR", (2, 2, 2))
    (shards / "train-000001.tar").unlink()
    (shards / "train-000001.tar").symlink_to(DEV_ZERO)
    (shards / "train-000002.tar").unlink()
    (shards / "train-000002.tar").mkdir()
    status, err = run_verify(capsys, str(shards))
    assert status == 1
    assert "FAIL shard train-000001.tar: not a regular file (a character device)" in err[0]
    assert "FAIL shard train-000002.tar: not a regular file (a directory)" in err[1]


@needs_dev_zero
def test_the_loader_says_not_a_regular_file_for_a_device_or_folder_shard(tmp_path: Path) -> None:
    shards = tmp_path / "DIR"
    write_shards(shards, (2, 2))
    (shards / "train-000001.tar").unlink()
    (shards / "train-000001.tar").mkdir()
    for root in (shards, DEV_ZERO):
        with pytest.raises(UserError) as raised:
            build(root)
        message = one_line(raised.value)
        assert "not regular files" in message and "do not exist" not in message and "no such" not in message
        assert (str(shards / "train-000001.tar") if root == shards else str(DEV_ZERO)) in message


@pytest.mark.parametrize("kind", ["empty tars", "zero bytes"])
def test_index_of_a_folder_without_samples_fails(tmp_path: Path, capsys: pytest.CaptureFixture, kind: str) -> None:
    shards = tmp_path / "DIR"
    shards.mkdir()
    for number in range(4):
        path = shards / f"train-{number:06d}.tar"
        if kind == "empty tars":
            tarfile.open(path, "w").close()
        else:
            path.touch()
    status, err = run_verify(capsys, str(shards), "--index")
    assert status == 1
    assert any(line.startswith("FAIL") and "0 samples" in line for line in err), err
    assert os.path.basename(str(shards)) in err[-1]
