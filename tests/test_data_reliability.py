"""Bad data roots, manifests and files: one-line user errors, skipped-and-counted samples, symlinked trees."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from scale.config import DataConfig
from scale.data import LoaderSpec, build_dataset
from scale.data.image_folder import ImageFolderData
from scale.errors import UserError, run_command
from scale.shards import DataPrepError, fashion_mnist, imagefolder, verify
from scale.shards.source_tree import walk_files

REPO = Path(__file__).resolve().parents[1]

IMG = 16


def image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def save_image(path: Path, seed: int, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, fmt))


def write_tar(path: Path, samples: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def wds_config(root: str, **fields) -> DataConfig:
    return DataConfig(name="webdataset", root=root, num_workers=0, shuffle_buffer=0, **fields)


def user_error(cfg: DataConfig, train: bool = True) -> str:
    """The one line a command prints for building this data set; asserts it is a UserError."""
    with pytest.raises(UserError) as err:
        build_dataset(cfg, IMG, 3, train)
    message = str(err.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- 1. roots and manifests

def test_missing_or_empty_shard_roots_name_the_setting(tmp_path: Path) -> None:
    message = user_error(wds_config(str(tmp_path / "absent")))
    assert message.startswith(f"data.root '{tmp_path / 'absent'}': no such directory")
    assert "brace pattern such as /data/train-{000000..000099}.tar" in message
    assert "data.val_root" in user_error(wds_config("", val_root=str(tmp_path / "nope")), train=False)
    (tmp_path / "images" / "cat").mkdir(parents=True)  # an image folder is no shard directory
    assert "without .tar shards" in user_error(wds_config(str(tmp_path / "images")))
    assert "glob patterns are not expanded" in user_error(wds_config(str(tmp_path / "*.tar")))
    assert "not a valid brace pattern" in user_error(wds_config(str(tmp_path / "x-{000..}.tar")))


def test_a_root_that_is_not_a_shard_is_a_user_error(tmp_path: Path) -> None:
    save_image(tmp_path / "photo.png", 0)
    message = user_error(wds_config(str(tmp_path / "photo.png")))
    assert "data.root" in message and "photo.png is not a tar shard" in message


BAD_MANIFESTS = {
    "not json": "{not json",
    "a list": "[1, 2]",
    "other format": json.dumps({"format": "v0", "shards": []}),
    "shards not a list": json.dumps({"format": "scale-wds-v1", "shards": {"a.tar": 3}}),
    "count a string": json.dumps({"format": "scale-wds-v1", "shards": [{"name": "a.tar", "num_samples": "3"}]}),
    "count a float": json.dumps({"format": "scale-wds-v1", "shards": [{"name": "a.tar", "num_samples": 2.5}]}),
    "count negative": json.dumps({"format": "scale-wds-v1", "shards": [{"name": "a.tar", "num_samples": -1}]}),
    "count a bool": json.dumps({"format": "scale-wds-v1", "shards": [{"name": "a.tar", "num_samples": True}]}),
    "no name": json.dumps({"format": "scale-wds-v1", "shards": [{"num_samples": 3}]}),
    "listed twice": json.dumps({"format": "scale-wds-v1", "shards": [{"name": "a.tar", "num_samples": 3}] * 2}),
}


@pytest.mark.parametrize("kind", sorted(BAD_MANIFESTS))
def test_invalid_manifests_are_user_errors_naming_it(tmp_path: Path, kind: str) -> None:
    write_tar(tmp_path / "shards" / "a.tar", 3)
    manifest = tmp_path / "shards" / "manifest.json"
    manifest.write_text(BAD_MANIFESTS[kind])
    next_to_shards = user_error(wds_config(str(tmp_path / "shards")))
    assert next_to_shards.startswith(f"data.root '{tmp_path / 'shards'}': {manifest}:")
    assert "scale-wds-v1" in next_to_shards
    explicit = user_error(wds_config(str(tmp_path / "shards" / "a.tar"), manifest=str(manifest)))
    assert explicit.startswith(f"data.manifest '{manifest}':")


def test_a_missing_manifest_setting_names_it(tmp_path: Path) -> None:
    write_tar(tmp_path / "a.tar", 3)
    message = user_error(wds_config(str(tmp_path), manifest=str(tmp_path / "gone.json")))
    assert message.startswith(f"data.manifest '{tmp_path / 'gone.json'}': no such file")


def cut(data: bytes, how: str) -> bytes:
    if how == "mid-member":
        return data[:1800]
    if how == "mid-header":
        return data[:512 * 5 + 200]
    if how == "at-a-member-boundary":
        return data[:512 * 4]  # two whole members, no end-of-archive block
    if how == "garbage":
        return b"not a tar at all " * 64
    return b""  # empty


@pytest.mark.parametrize("how", ["mid-member", "mid-header", "at-a-member-boundary", "garbage", "empty"])
def test_a_truncated_shard_found_while_counting_is_named(tmp_path: Path, how: str) -> None:
    for i in range(3):
        write_tar(tmp_path / f"train-{i:06d}.tar", 4)
    broken = tmp_path / "train-000001.tar"
    broken.write_bytes(cut(broken.read_bytes(), how))
    message = user_error(wds_config(str(tmp_path)))
    assert f"shard {broken} is" in message and "data.root" in message and "manifest" in message


def test_sound_shards_are_still_counted(tmp_path: Path) -> None:
    write_tar(tmp_path / "train-000000.tar", 4)
    write_tar(tmp_path / "train-000001.tar", 7)
    assert build_dataset(wds_config(str(tmp_path)), IMG, 3, True).num_samples == 11


def test_commands_report_a_bad_root_as_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def body() -> int:
        build_dataset(wds_config(str(tmp_path / "absent")), IMG, 3, True)
        return 0
    assert run_command("scale-train", body) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scale-train: error: data.root") and "Traceback" not in err


@pytest.mark.parametrize("layout", ["missing", "a file", "empty", "class folders without images"])
def test_image_folder_roots_without_images_name_data_root(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "root"
    if layout == "a file":
        root.write_text("x")
    elif layout == "empty":
        root.mkdir()
    elif layout == "class folders without images":
        (root / "cat").mkdir(parents=True)
        (root / "cat" / "readme.txt").write_text("x")
    message = user_error(DataConfig(name="image_folder", root=str(root)))
    assert message.startswith(f"data.root '{root}") and "root/<class>/<image>" in message


# ----------------------------------------------------------------------------- 2. bad images in an image folder

def image_tree(root: Path, bad: Sequence[str] = ()) -> Path:
    """Three classes of six PNGs; the files named in `bad` are broken in different ways."""
    for c, name in enumerate(("ant", "bee", "cow")):
        for i in range(6):
            save_image(root / name / f"{i}.png", seed=10 * c + i)
    for k, rel in enumerate(bad):
        path = root / rel
        path.unlink()
        if k % 4 == 0:
            path.write_bytes(b"this is text, not a PNG")
        elif k % 4 == 1:
            path.write_bytes(image_bytes(99)[:300])  # truncated
        elif k % 4 == 2:
            path.write_bytes(b"")
        else:
            path.symlink_to(root / "nowhere.png")  # unreadable
    return root


BAD = ("ant/1.png", "bee/0.png", "bee/4.png", "cow/5.png")


def folder(root: Path, **fields) -> ImageFolderData:
    data = build_dataset(DataConfig(name="image_folder", root=str(root), **fields), IMG, 3)
    assert isinstance(data, ImageFolderData)
    return data


def collect(data, spec: LoaderSpec, epoch: int, start: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y, _ in data.loader(spec, epoch, start)]


def test_bad_images_are_replaced_counted_and_do_not_shift_the_others(tmp_path: Path) -> None:
    clean = folder(image_tree(tmp_path / "clean"))
    data = folder(image_tree(tmp_path / "bad", BAD))
    assert data.num_samples == clean.num_samples == 18
    spec = LoaderSpec(batch_size=6, seed=1)
    got, want = collect(data, spec, 0), collect(clean, spec, 0)
    assert data.skipped_samples() == len(BAD)  # every index once per epoch
    assert [len(y) for _, y in got] == [6, 6, 6] and -1 not in torch.cat([y for _, y in got]).tolist()
    bad_indices = {data.source.files.index(rel) for rel in BAD}
    order = data.rank_indices(spec, 0)
    for b, ((x, _), (cx, _)) in enumerate(zip(got, want)):
        for j in range(6):
            if order[6 * b + j] not in bad_indices:  # every good sample sits where it would without bad files
                assert torch.equal(x[j], cx[j])


def test_replacement_is_the_same_with_workers_and_after_a_resume(tmp_path: Path) -> None:
    data = folder(image_tree(tmp_path, BAD))
    spec = LoaderSpec(batch_size=3, seed=4)
    full = collect(data, spec, 2)
    with_workers = collect(data, LoaderSpec(batch_size=3, seed=4, num_workers=2), 2)
    resumed = collect(data, spec, 2, start=4)
    for a, b in zip(full, with_workers):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Counted in the worker processes, summed here: 4 in each of the first two passes.
    assert data.skipped_samples() == 2 * len(BAD) + sum(
        i in {data.source.files.index(rel) for rel in BAD} for i in data.rank_indices(spec, 2)[12:])


def test_bad_images_log_a_rate_limited_warning_naming_the_file(tmp_path: Path, caplog) -> None:
    data = folder(image_tree(tmp_path, BAD))
    with caplog.at_level(logging.WARNING, logger="scale.data.image_folder"):
        collect(data, LoaderSpec(batch_size=6, seed=0), 0)
    assert "skipping unreadable or corrupt image" in caplog.text
    assert all(rel in caplog.text for rel in BAD)


# ----------------------------------------------------------------------------- 3. symlinks in source trees

def looping_tree(root: Path) -> Tuple[Path, List[str]]:
    """cat/ and dog/ with real images, plus every kind of repeated path; returns the real files."""
    for c, name in enumerate(("cat", "dog")):
        for i in range(3):
            save_image(root / name / f"{i}.jpg", seed=10 * c + i, fmt="JPEG")
    save_image(root / "cat" / "deep" / "x.jpg", seed=50, fmt="JPEG")
    (root / "cat" / "self").symlink_to(".")  # a loop onto its own folder
    (root / "cat" / "deep" / "up").symlink_to("../..")  # a loop onto the top folder
    (root / "dog" / "cats").symlink_to("../cat")  # a link into another class
    (root / "fox").symlink_to("cat")  # a second class folder that is the same folder
    (root / "dog" / "alias.jpg").symlink_to("../cat/0.jpg")  # a second path to one file
    real = [f"cat/{i}.jpg" for i in range(3)] + ["cat/deep/x.jpg"] + [f"dog/{i}.jpg" for i in range(3)]
    return root, sorted(real)


@pytest.mark.timeout(120)
def test_walk_files_lists_each_real_file_once(tmp_path: Path) -> None:
    root, real = looping_tree(tmp_path / "src")
    files, left_out = walk_files(root, ["cat", "dog", "fox"])
    assert files == real
    assert {path for path, _ in left_out} == {"cat/self", "cat/deep/up", "dog/cats", "fox", "dog/alias.jpg"}
    assert "same file as cat/0.jpg" in dict(left_out)["dog/alias.jpg"]


@pytest.mark.timeout(120)
def test_a_symlinked_class_folder_outside_the_tree_is_followed(tmp_path: Path) -> None:
    save_image(tmp_path / "elsewhere" / "a.png", 1)
    save_image(tmp_path / "src" / "real" / "b.png", 2)
    (tmp_path / "src" / "linked").symlink_to(tmp_path / "elsewhere")
    assert walk_files(tmp_path / "src", ["linked", "real"]) == (["linked/a.png", "real/b.png"], [])


@pytest.mark.timeout(120)
def test_converter_never_converts_a_file_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, real = looping_tree(tmp_path / "src")
    out = tmp_path / "out"
    assert imagefolder.main(["--src", str(root), "--out", str(out), "--workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    paths = []
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            paths += [json.loads(f["json"])["path"] for _, f in verify.iter_samples(tar)]
    assert sorted(paths) == real
    assert manifest["classes"] == {"cat": 0, "dog": 1, "fox": 2}
    assert {"fox", "dog/cats", "dog/alias.jpg"} <= {entry["path"] for entry in manifest["skipped"]}


@pytest.mark.timeout(120)
def test_image_folder_dataset_never_loads_a_file_twice(tmp_path: Path) -> None:
    root, real = looping_tree(tmp_path / "src")
    data = folder(root)
    assert data.source.files == real and data.num_samples == len(real)


# ----------------------------------------------------------------------------- 4. data_prep commands (scale.shards)

def test_data_prep_errors_are_user_errors() -> None:
    assert issubclass(DataPrepError, UserError)


def one_line_error(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and "Traceback" not in err
    return err


def test_verifier_user_errors_exit_2_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify.main([str(tmp_path), "--workers", "1"]) == 2
    assert "no manifest" in one_line_error(capsys, "verify_shards")
    (tmp_path / "manifest.json").write_text("{broken")
    assert verify.main([str(tmp_path), "--workers", "1"]) == 2
    assert "unreadable manifest" in one_line_error(capsys, "verify_shards")
    (tmp_path / "manifest.json").write_text(BAD_MANIFESTS["count a string"])
    assert verify.main([str(tmp_path), "--workers", "1"]) == 2
    assert "num_samples" in one_line_error(capsys, "verify_shards")


def test_converter_user_errors_exit_2_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "loose.jpg").write_bytes(b"x")
    assert imagefolder.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    assert "no class folders" in one_line_error(capsys, "imagefolder_to_wds")
    save_image(tmp_path / "src" / "cat" / "a.png", 0)
    (tmp_path / "file").write_text("x")
    assert imagefolder.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "file")]) == 2
    assert "not a directory" in one_line_error(capsys, "imagefolder_to_wds")
    assert fashion_mnist.main(["--src", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 2
    assert "apt-get install" in one_line_error(capsys, "fashion_mnist_to_wds")


@pytest.mark.parametrize("script", ["verify_shards", "imagefolder_to_wds", "fashion_mnist_to_wds"])
def test_scripts_exit_2_without_a_traceback(tmp_path: Path, script: str) -> None:
    src = tmp_path / "src"  # an empty folder: no manifest, no class folders, no IDX files
    src.mkdir()
    args = [str(src)] if script == "verify_shards" else ["--src", str(src), "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "data_prep" / f"{script}.py"), *args],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
