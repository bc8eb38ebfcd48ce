"""Tests for scale.shards (and the data_prep/ scripts over it): ImageFolder and Fashion-MNIST -> WebDataset
conversion, and the verifier."""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import tarfile
import termios
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scale.shards import fashion_mnist, imagefolder, verify
from scale.shards.shard_writing import (
    TEST_SHARD_DELAY_ENV,
    ResumableShardWriter,
    ResumeState,
    ustar_header,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------------
# Helpers


def save_noise_jpeg(path: Path, width: int = 40, height: int = 30, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def make_class_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog", "eel"), per_class: int = 7) -> Path:
    for class_number, class_name in enumerate(classes):
        for image_number in range(per_class):
            save_noise_jpeg(root / class_name / f"img{image_number}.jpg", seed=class_number * 100 + image_number)
    return root


def convert(*args: str | Path) -> int:
    """Run the converter in this process, single worker (no pool start-up cost)."""
    return imagefolder.main([str(arg) for arg in args] + ["--workers", "1"])


def read_samples(out_dir: Path) -> list[tuple[str, str, dict[str, bytes]]]:
    """(shard name, key, {extension: bytes}) for every sample of every shard in manifest order."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    samples = []
    for shard in manifest["shards"]:
        with tarfile.open(out_dir / shard["name"]) as tar:
            for key, files in verify.iter_samples(tar):
                samples.append((shard["name"], key, files))
    return samples


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out_dir.glob("*.tar"))}


def decode_rgb(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.mode == "RGB"
        return np.asarray(image).astype(int)


def convert_single_image(tmp_path: Path, image: Image.Image, filename: str, **save_options: object) -> np.ndarray:
    """Convert a one-image tree (re-encoding at quality 100) and return the stored pixels."""
    path = tmp_path / "src" / "only" / filename
    path.parent.mkdir(parents=True)
    image.save(path, **save_options)
    assert convert("--src", tmp_path / "src", "--out", tmp_path / "out", "--quality", "100") == 0
    [(_, _, files)] = read_samples(tmp_path / "out")
    return decode_rgb(files["jpg"])


# --------------------------------------------------------------------------------------------------
# Converter: layout, manifest, options


def test_converter_writes_shards_and_manifest_in_the_agreed_schema(tmp_path: Path) -> None:
    src = make_class_tree(tmp_path / "src")
    out = tmp_path / "out"
    assert convert("--src", src, "--out", out, "--shard-size", "5") == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest) == {"format", "split", "total_samples", "shards", "classes", "options", "skipped"}
    assert manifest["format"] == "scale-wds-v1" and manifest["split"] == "train"
    assert manifest["total_samples"] == 21
    assert [shard["name"] for shard in manifest["shards"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert [shard["num_samples"] for shard in manifest["shards"]] == [5, 5, 5, 5, 1]
    for shard in manifest["shards"]:
        assert set(shard) == {"name", "num_samples", "sha256"}
        assert shard["sha256"] == hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest()
    assert manifest["classes"] == {"cat": 0, "dog": 1, "eel": 2}
    assert manifest["options"]["shard_size"] == 5 and manifest["options"]["seed"] == 0
    assert manifest["skipped"] == []
    assert sorted(path.name for path in out.iterdir()) == ["manifest.json"] + [
        name for i in range(5) for name in (f"train-{i:06d}.tar", f"train-{i:06d}.tar.idx.json")]

    samples = read_samples(out)
    keys = [key for _, key, _ in samples]
    assert keys == [f"{i:09d}" for i in range(21)]  # unique, zero-padded global index
    for _, _, files in samples:
        assert sorted(files) == ["cls", "jpg", "json"]
        metadata = json.loads(files["json"])
        assert set(metadata) == {"path", "width", "height", "class_name"}
        assert int(files["cls"]) == manifest["classes"][metadata["class_name"]]
        assert metadata["path"].split("/")[0] == metadata["class_name"]
        assert (metadata["width"], metadata["height"]) == (40, 30)
        # An intact RGB JPEG with no resize asked is stored as its original bytes.
        assert files["jpg"] == (src / metadata["path"]).read_bytes()


def test_global_shuffle_mixes_classes_and_follows_the_seed(tmp_path: Path) -> None:
    src = make_class_tree(tmp_path / "src")

    def class_order(seed: str, out_name: str) -> list[str]:
        assert convert("--src", src, "--out", tmp_path / out_name, "--seed", seed) == 0
        return [json.loads(files["json"])["path"] for _, _, files in read_samples(tmp_path / out_name)]

    seed0, seed0_again, seed1 = class_order("0", "a"), class_order("0", "b"), class_order("1", "c")
    assert seed0 == seed0_again
    assert seed0 != seed1 and sorted(seed0) == sorted(seed1)
    first_five_classes = {path.split("/")[0] for path in seed0[:5]}
    assert len(first_five_classes) > 1, "the first shard's worth of samples should mix classes"
    assert seed0 != sorted(seed0)


def test_limit_converts_a_subset(tmp_path: Path) -> None:
    src = make_class_tree(tmp_path / "src")
    assert convert("--src", src, "--out", tmp_path / "out", "--limit", "4") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["total_samples"] == 4 and len(read_samples(tmp_path / "out")) == 4


def test_resize_bounds_the_shorter_side_and_quality_sets_the_encoding(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save_noise_jpeg(src / "a" / "wide.jpg", width=80, height=40, seed=1)
    save_noise_jpeg(src / "a" / "tall.jpg", width=30, height=90, seed=2)
    save_noise_jpeg(src / "b" / "small.jpg", width=12, height=10, seed=3)
    stored: dict[str, dict[str, dict]] = {}
    for quality in ("30", "95"):
        out = tmp_path / f"q{quality}"
        assert convert("--src", src, "--out", out, "--resize", "20", "--quality", quality) == 0
        stored[quality] = {}
        for _, _, files in read_samples(out):
            metadata = json.loads(files["json"])
            with Image.open(io.BytesIO(files["jpg"])) as image:
                assert image.size == (metadata["width"], metadata["height"])
            stored[quality][metadata["path"]] = {"meta": metadata, "jpg": files["jpg"]}
    sizes = {path: (entry["meta"]["width"], entry["meta"]["height"]) for path, entry in stored["95"].items()}
    assert sizes == {"a/wide.jpg": (40, 20), "a/tall.jpg": (20, 60), "b/small.jpg": (12, 10)}
    # Already small enough: kept as the original bytes whatever the quality.
    assert stored["30"]["b/small.jpg"]["jpg"] == (src / "b" / "small.jpg").read_bytes()
    assert len(stored["30"]["a/wide.jpg"]["jpg"]) < len(stored["95"]["a/wide.jpg"]["jpg"])


def test_shard_bytes_caps_each_shard(tmp_path: Path) -> None:
    src = make_class_tree(tmp_path / "src", per_class=8)
    out = tmp_path / "out"
    limit = 40_000
    assert convert("--src", src, "--out", out, "--shard-bytes", str(limit)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) > 1
    assert manifest["total_samples"] == 24
    for shard in manifest["shards"]:
        assert (out / shard["name"]).stat().st_size <= limit


def test_shard_size_and_bytes_together_cut_at_whichever_comes_first(tmp_path: Path) -> None:
    src = make_class_tree(tmp_path / "src", per_class=8)
    out = tmp_path / "out"
    assert convert("--src", src, "--out", out, "--shard-size", "3", "--shard-bytes", "1000000") == 0
    counts = [shard["num_samples"] for shard in json.loads((out / "manifest.json").read_text())["shards"]]
    assert counts == [3] * 8


def test_val_layout_uses_the_labels_file_and_the_train_class_indices(tmp_path: Path) -> None:
    val = tmp_path / "val"
    names = ["ILSVRC_val_03.JPEG", "ILSVRC_val_01.JPEG", "ILSVRC_val_02.JPEG"]
    for seed, name in enumerate(names):
        save_noise_jpeg(val / name, seed=seed)
    labels = tmp_path / "val_labels.txt"
    labels.write_text("dog\neel\ncat\n")  # for _01, _02, _03: sorted file-name order
    train_classes = tmp_path / "classes.txt"
    train_classes.write_text("ant\ncat\ndog\neel\n")
    out = tmp_path / "out"
    assert convert("--src", val, "--out", out, "--split", "val", "--val-labels", labels, "--classes", train_classes) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split"] == "val" and manifest["shards"][0]["name"] == "val-000000.tar"
    assert manifest["classes"] == {"ant": 0, "cat": 1, "dog": 2, "eel": 3}
    labelled = {json.loads(f["json"])["path"]: (json.loads(f["json"])["class_name"], int(f["cls"])) for _, _, f in read_samples(out)}
    assert labelled == {
        "ILSVRC_val_01.JPEG": ("dog", 2),
        "ILSVRC_val_02.JPEG": ("eel", 3),
        "ILSVRC_val_03.JPEG": ("cat", 1),
    }


def test_val_labels_count_mismatch_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_noise_jpeg(tmp_path / "val" / "a.JPEG")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    assert convert("--src", tmp_path / "val", "--out", tmp_path / "out", "--val-labels", labels) == 2
    error = capsys.readouterr().err
    assert "--val-labels" in error and "2 labels" in error and "1 files" in error


def test_labels_csv_layout_and_a_listed_file_that_is_missing(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    save_noise_jpeg(flat / "x.jpg", seed=1)
    save_noise_jpeg(flat / "y.jpg", seed=2)
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,label\nx.jpg,shoe\ny.jpg,bag\ngone.jpg,bag\n")
    out = tmp_path / "out"
    assert convert("--src", flat, "--out", out, "--labels", labels) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == {"bag": 0, "shoe": 1}
    assert {json.loads(f["json"])["path"]: int(f["cls"]) for _, _, f in read_samples(out)} == {"x.jpg": 1, "y.jpg": 0}
    assert [entry["path"] for entry in manifest["skipped"]] == ["gone.jpg"]
    assert "unreadable" in manifest["skipped"][0]["reason"]


# --------------------------------------------------------------------------------------------------
# Converter: bad and unusual input


def test_bad_files_are_skipped_listed_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_class_tree(tmp_path / "src", classes=("cat", "dog"), per_class=2)
    good_jpeg = (src / "cat" / "img0.jpg").read_bytes()
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, format="PNG")
    (src / "cat" / "notes.txt").write_text("not an image")
    (src / "cat" / "empty.jpg").write_bytes(b"")
    (src / "dog" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) * 2 // 3])
    (src / "dog" / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (src / "dog" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (src / "stray.jpg").write_bytes(good_jpeg)  # not inside a class folder
    out = tmp_path / "out"

    assert convert("--src", src, "--out", out) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(reasons) == {
        "cat/notes.txt", "cat/empty.jpg", "dog/truncated.jpg", "dog/truncated.png", "dog/dangling.jpg", "stray.jpg",
    }
    assert "not an image" in reasons["cat/notes.txt"]
    assert "truncated" in reasons["dog/truncated.jpg"]
    assert "unreadable" in reasons["dog/dangling.jpg"]
    assert "class folder" in reasons["stray.jpg"]
    assert manifest["total_samples"] == 4
    captured = capsys.readouterr()
    for path, reason in reasons.items():
        assert f"skipped {path}: {reason}" in captured.err
    assert "converted 4 images, skipped 6 files" in captured.out


def test_same_file_name_in_two_classes_gives_two_samples(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save_noise_jpeg(src / "n01" / "same.JPEG", seed=1)
    save_noise_jpeg(src / "n02" / "same.JPEG", seed=2)
    assert convert("--src", src, "--out", tmp_path / "out") == 0
    samples = read_samples(tmp_path / "out")
    assert len({key for _, key, _ in samples}) == 2
    assert sorted((json.loads(f["json"])["path"], int(f["cls"])) for _, _, f in samples) == [
        ("n01/same.JPEG", 0),
        ("n02/same.JPEG", 1),
    ]


def test_grayscale_becomes_gray_rgb(tmp_path: Path) -> None:
    pixels = convert_single_image(tmp_path, Image.new("L", (16, 16), 100), "gray.png")
    assert np.abs(pixels - 100).max() <= 2


def test_grayscale_jpeg_is_reencoded_as_rgb(tmp_path: Path) -> None:
    pixels = convert_single_image(tmp_path, Image.new("L", (16, 16), 60), "gray.jpg", quality=95)
    assert pixels.shape == (16, 16, 3) and np.abs(pixels - 60).max() <= 3


def test_palette_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (32, 16), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red, 1: blue (transparent below)
    image.paste(1, (16, 0, 32, 16))
    pixels = convert_single_image(tmp_path, image, "palette.png", transparency=1)
    assert np.abs(pixels[8, 4] - [255, 0, 0]).max() <= 8
    assert np.abs(pixels[8, 28] - [255, 255, 255]).max() <= 8


def test_cmyk_is_converted_to_rgb(tmp_path: Path) -> None:
    image = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # red
    image.paste((0, 0, 0, 255), (16, 0, 32, 16))  # black
    pixels = convert_single_image(tmp_path, image, "cmyk.tif")
    assert np.abs(pixels[8, 4] - [255, 0, 0]).max() <= 8
    assert np.abs(pixels[8, 28] - [0, 0, 0]).max() <= 8


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (48, 16), (0, 0, 255, 0))  # fully transparent blue -> white
    image.paste((0, 0, 255, 255), (16, 0, 32, 16))  # opaque blue
    image.paste((0, 0, 0, 128), (32, 0, 48, 16))  # half-transparent black -> mid gray
    pixels = convert_single_image(tmp_path, image, "rgba.png")
    assert np.abs(pixels[8, 4] - [255, 255, 255]).max() <= 8
    assert np.abs(pixels[8, 20] - [0, 0, 255]).max() <= 8
    assert np.abs(pixels[8, 36] - [127, 127, 127]).max() <= 8


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.zeros((16, 48), dtype=np.uint16)
    values[:, 16:32] = 32768
    values[:, 32:] = 65535
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    pixels = convert_single_image(tmp_path, image, "deep.png")
    assert np.abs(pixels[8, 4] - 0).max() <= 3
    assert np.abs(pixels[8, 20] - 128).max() <= 3  # Pillow's own I;16 -> L would clip this to 255
    assert np.abs(pixels[8, 40] - 255).max() <= 3


def test_one_pixel_image_is_kept(tmp_path: Path) -> None:
    pixels = convert_single_image(tmp_path, Image.new("RGB", (1, 1), (10, 200, 30)), "dot.png")
    assert pixels.shape == (1, 1, 3) and np.abs(pixels[0, 0] - [10, 200, 30]).max() <= 8


# --------------------------------------------------------------------------------------------------
# Converter: safety, resumption, determinism, CLI


def test_complete_output_is_not_overwritten_without_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_class_tree(tmp_path / "src")
    out = tmp_path / "out"
    assert convert("--src", src, "--out", out, "--shard-size", "5") == 0
    before = shard_bytes(out)
    assert convert("--src", src, "--out", out, "--shard-size", "100") == 2
    error = capsys.readouterr().err
    assert str(out) in error and "--overwrite" in error
    assert shard_bytes(out) == before

    assert convert("--src", src, "--out", out, "--shard-size", "100", "--overwrite") == 0
    assert sorted(shard_bytes(out)) == ["train-000000.tar"]  # the old shards 1..4 are gone
    assert json.loads((out / "manifest.json").read_text())["total_samples"] == 21


@pytest.mark.parametrize(
    ("bad_args", "named"),
    [
        (["--shard-size", "0"], "--shard-size"),
        (["--shard-bytes", "lots"], "--shard-bytes"),
        (["--quality", "101"], "--quality"),
        (["--resize", "-3"], "--resize"),
        (["--workers", "0"], "--workers"),
        (["--split", "a/b"], "--split"),
        (["--val-labels", "/no/such/labels.txt"], "--val-labels"),
        (["--classes", "/no/such/classes.txt"], "--classes"),
        (["--out", "SRC/wds"], "--out"),
    ],
)
def test_bad_cli_input_is_a_clear_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad_args: list[str], named: str
) -> None:
    src = make_class_tree(tmp_path / "src", per_class=1)
    bad_args = [arg.replace("SRC", str(src)) for arg in bad_args]
    with pytest.raises(SystemExit) as exit_info:
        imagefolder.main(["--src", str(src), "--out", str(tmp_path / "out"), *bad_args])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_missing_src_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        imagefolder.main(["--src", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert "--src" in error and "absent" in error and "not a directory" in error


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_same_bytes(tmp_path: Path) -> None:
    src = make_class_tree(tmp_path / "src", per_class=10)
    reference = tmp_path / "reference"
    assert convert("--src", src, "--out", reference, "--shard-size", "3") == 0

    out = tmp_path / "out"
    command = [
        sys.executable, str(REPO_ROOT / "data_prep" / "imagefolder_to_wds.py"),
        "--src", str(src), "--out", str(out), "--shard-size", "3", "--workers", "2",
    ]
    slow = {**os.environ, TEST_SHARD_DELAY_ENV: "0.3"}
    # Own session, so the kill takes the pool workers down too, like a preempted job.
    process = subprocess.Popen(command, env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(list(out.glob("train-*.tar"))) >= 2 and list(out.glob("train-*.tar.tmp")):
                break
            assert process.poll() is None, "the conversion finished before it could be interrupted"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    assert list(out.glob("train-*.tar.tmp")), "the kill should have left a shard half-written"
    kept_inode = (out / "train-000000.tar").stat().st_ino

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming: keeping" in rerun.stderr
    assert (out / "train-000000.tar").stat().st_ino == kept_inode, "a complete shard was rewritten"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*progress*"))
    assert shard_bytes(out) == shard_bytes(reference)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((reference / "manifest.json").read_text())


def test_interrupted_run_resumes_only_with_the_same_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_class_tree(tmp_path / "src")
    out = tmp_path / "out"

    def crash(*_: object) -> None:
        raise KeyboardInterrupt  # dies after all shards are renamed, before the manifest

    with monkeypatch.context() as patch:
        patch.setattr(imagefolder, "write_manifest", crash)
        with pytest.raises(KeyboardInterrupt):
            convert("--src", src, "--out", out, "--shard-size", "4")
    assert not (out / "manifest.json").exists()
    capsys.readouterr()

    assert convert("--src", src, "--out", out, "--shard-size", "4", "--seed", "7") == 2
    error = capsys.readouterr().err
    assert "interrupted conversion" in error and "seed" in error and "--overwrite" in error

    extra = src / "cat" / "added_later.jpg"
    save_noise_jpeg(extra, seed=99)
    assert convert("--src", src, "--out", out, "--shard-size", "4") == 2
    assert "source_files_sha256" in capsys.readouterr().err
    extra.unlink()

    assert convert("--src", src, "--out", out, "--shard-size", "4") == 0
    assert "resuming: keeping 6 complete shard(s)" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["total_samples"] == 21


def test_progress_bar_shows_when_interactive(tmp_path: Path) -> None:
    src = make_class_tree(tmp_path / "src", per_class=2)
    controller, terminal = pty.openpty()
    # A fresh pty is 0 columns wide, which tqdm honours by printing nothing: give it a real size.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        process = subprocess.run(
            [sys.executable, "-m", "data_prep.imagefolder_to_wds", "--src", str(src), "--out", str(tmp_path / "out"), "--workers", "1"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=terminal, timeout=60,
        )
        os.close(terminal)
        terminal = -1
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the pty reports EIO once everything has been read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert process.returncode == 0
    text = shown.decode(errors="replace")
    assert "6/6" in text and "file/s" in text  # tqdm's count and rate on a terminal
    assert process.stdout.decode().count("\n") == 1 and "converted 6 images" in process.stdout.decode()


def test_progress_bar_is_silent_when_not_interactive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_class_tree(tmp_path / "src", per_class=2)
    assert convert("--src", src, "--out", tmp_path / "out") == 0
    assert "file/s" not in capsys.readouterr().err


@pytest.mark.parametrize("script", ["imagefolder_to_wds", "verify_shards", "fashion_mnist_to_wds"])
def test_scripts_run_as_a_file_and_as_a_module(script: str, tmp_path: Path) -> None:
    for command in (
        [sys.executable, str(REPO_ROOT / "data_prep" / f"{script}.py"), "--help"],
        [sys.executable, "-m", f"data_prep.{script}", "--help"],
    ):
        # From an unrelated folder for the file form: the script must find its package by itself.
        cwd = tmp_path if command[1].endswith(".py") else REPO_ROOT
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout


# --------------------------------------------------------------------------------------------------
# Shard writing


@pytest.mark.parametrize(("name", "size"), [("000000001.jpg", 0), ("000000001.json", 511), ("k" * 96 + ".png", 123_456_789)])
def test_ustar_header_is_what_tarfile_writes(name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_shard_writer_output_equals_tarfile_with_fixed_headers(tmp_path: Path) -> None:
    samples = [(f"{i:09d}", {"cls": str(i).encode(), "bin": bytes(range(i * 37 % 256)) * (i + 1)}) for i in range(5)]
    writer = ResumableShardWriter(tmp_path, "train", None, 10**9, {}, ResumeState())
    for index, (key, files) in enumerate(samples):
        writer.add_sample(index, key, files)
    writer.close()

    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for extension in sorted(files):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(files[extension]), 0, 0o644, 0, 0, "", ""
                tar.addfile(info, io.BytesIO(files[extension]))
    assert (tmp_path / "train-000000.tar").read_bytes() == expected.getvalue()


# --------------------------------------------------------------------------------------------------
# Verifier


@pytest.fixture
def converted(tmp_path: Path) -> Path:
    src = make_class_tree(tmp_path / "src", per_class=3)
    out = tmp_path / "out"
    assert convert("--src", src, "--out", out, "--shard-size", "4") == 0
    return out


def run_verifier(out: Path) -> int:
    return verify.main([str(out), "--workers", "1"])


def rewrite_manifest(out: Path, change: Callable[[dict], object]) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_verifier_accepts_a_sound_conversion(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_verifier(converted) == 0
    assert "OK" in capsys.readouterr().out


def test_verifier_runs_with_worker_processes(converted: Path) -> None:
    assert verify.main([str(converted), "--workers", "2"]) == 0


def test_verifier_names_a_missing_shard(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (converted / "train-000001.tar").unlink()
    assert run_verifier(converted) == 1
    assert "shard train-000001.tar: missing" in capsys.readouterr().err


def test_verifier_names_a_shard_with_a_bad_checksum(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = converted / "train-000002.tar"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # in the end-of-archive padding: still a valid tar, only the checksum changes
    path.write_bytes(bytes(data))
    assert run_verifier(converted) == 1
    error = capsys.readouterr().err
    assert "shard train-000002.tar: sha256 mismatch" in error


def test_verifier_names_a_shard_with_a_wrong_count(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rewrite_manifest(converted, lambda manifest: manifest["shards"][0].update(num_samples=5))
    assert run_verifier(converted) == 1
    error = capsys.readouterr().err
    assert "shard train-000000.tar: sample count 4, manifest says 5" in error
    assert "total_samples 9 but its shards add up to 10" in error


def test_verifier_names_an_undecodable_sample(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = converted / "train-000000.tar"
    originals = [(key, files) for _, key, files in read_samples(converted)[:4]]
    truncated_key, truncated_files = originals[1]
    truncated = {**truncated_files, "jpg": truncated_files["jpg"][: len(truncated_files["jpg"]) // 2]}
    garbage = {"jpg": b"garbage", "cls": b"0", "json": b"{}"}
    with tarfile.open(broken, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in [("000000000", garbage), (truncated_key, truncated)] + originals[2:]:
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    sha256 = hashlib.sha256(broken.read_bytes()).hexdigest()
    rewrite_manifest(converted, lambda manifest: manifest["shards"][0].update(sha256=sha256))
    assert run_verifier(converted) == 1
    error = capsys.readouterr().err
    assert "shard train-000000.tar: sample 000000000: undecodable .jpg" in error
    assert f"shard train-000000.tar: sample {truncated_key}: undecodable .jpg" in error  # header fine, data cut


def test_verifier_without_manifest_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_verifier(tmp_path) == 2
    assert "no manifest" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = (0x08 << 8) | array.ndim  # unsigned bytes
    header = magic.to_bytes(4, "big") + b"".join(dim.to_bytes(4, "big") for dim in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def make_tiny_fashion_mnist(root: Path, num_train: int = 12, num_test: int = 5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    arrays = {}
    for split, prefix, count in (("train", "train", num_train), ("test", "t10k", num_test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[split] = (images, labels)
    return arrays


def test_fashion_mnist_conversion_is_lossless_with_a_manifest_per_split(tmp_path: Path) -> None:
    arrays = make_tiny_fashion_mnist(tmp_path / "fmnist")
    out = tmp_path / "out"
    assert fashion_mnist.main(["--src", str(tmp_path / "fmnist"), "--out", str(out), "--shard-size", "5", "--workers", "1"]) == 0
    for split, expected_counts in (("train", [5, 5, 2]), ("test", [5])):
        manifest = json.loads((out / split / "manifest.json").read_text())
        assert manifest["format"] == "scale-wds-v1" and manifest["split"] == split
        assert [shard["num_samples"] for shard in manifest["shards"]] == expected_counts
        assert manifest["shards"][0]["name"] == f"{split}-000000.tar"
        assert list(manifest["classes"]) == list(fashion_mnist.CLASS_NAMES)
        assert manifest["classes"]["Ankle boot"] == 9
        images, labels = arrays[split]
        samples = read_samples(out / split)
        assert len(samples) == len(images)
        for index, (_, key, files) in enumerate(samples):
            assert sorted(files) == ["cls", "json", "png"]
            with Image.open(io.BytesIO(files["png"])) as image:
                assert image.mode == "L" and image.size == (28, 28)
                assert np.array_equal(np.asarray(image), images[index])
            assert int(files["cls"]) == labels[index]
            assert json.loads(files["json"])["class_name"] == fashion_mnist.CLASS_NAMES[labels[index]]
        assert run_verifier(out / split) == 0


@pytest.mark.slow
def test_fashion_mnist_parallel_encoding_gives_the_same_shards(tmp_path: Path) -> None:
    make_tiny_fashion_mnist(tmp_path / "fmnist", num_train=6000, num_test=10)
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        assert fashion_mnist.main(["--src", str(tmp_path / "fmnist"), "--out", str(out), "--workers", workers]) == 0
        outputs.append(shard_bytes(out / "train"))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2


def test_fashion_mnist_missing_source_says_how_to_install_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    for src in (tmp_path / "absent", tmp_path / "empty"):
        assert fashion_mnist.main(["--src", str(src), "--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert str(src) in error and "apt-get install dataset-fashion-mnist" in error
    assert not (tmp_path / "out").exists()


def test_fashion_mnist_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_tiny_fashion_mnist(tmp_path / "fmnist")
    args = ["--src", str(tmp_path / "fmnist"), "--out", str(tmp_path / "out"), "--workers", "1"]
    assert fashion_mnist.main(args) == 0
    assert fashion_mnist.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert fashion_mnist.main(args + ["--overwrite"]) == 0


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_converts_into_enough_shards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    started = time.monotonic()
    assert fashion_mnist.main(["--out", str(out)]) == 0
    assert time.monotonic() - started < 45, "the conversion should take seconds"
    train = json.loads((out / "train" / "manifest.json").read_text())
    test = json.loads((out / "test" / "manifest.json").read_text())
    assert train["total_samples"] == 60_000 and len(train["shards"]) >= 8
    assert test["total_samples"] == 10_000
    assert sum(shard["num_samples"] for shard in train["shards"]) == 60_000
    images = fashion_mnist.read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz", 0x803)
    with tarfile.open(out / "test" / test["shards"][-1]["name"]) as tar:
        last_key, last_files = list(verify.iter_samples(tar))[-1]
    with Image.open(io.BytesIO(last_files["png"])) as image:
        assert np.array_equal(np.asarray(image), images[int(last_key)])
