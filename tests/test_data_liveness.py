"""A dead or hopeless data source ends the run (exit 2, one line) instead of hanging it, and
DataLoader workers never keep a process alive (issue 25, points 5 and 6)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

from conftest import python_env, tiny_overrides
from test_data_path import jpeg, photo
from test_data_prep import make_tiny_fashion_mnist
from test_data_reliability import collect, folder
from test_webdataset_loader import write_shards
from scale.config import DataConfig
from scale.data import LoaderSpec, build_dataset
from scale.data.device_input import DeviceInput
from scale.data.gpu_decode import DeviceJpegItems
from scale.data.transforms import PretrainTransform
from scale.errors import UserError
from scale.shards import fashion_mnist

NO_CURL = pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads URLs with curl")
UNREACHABLE_URL = "pipe:curl -s -f http://127.0.0.1:9/train-{000000..000003}.tar"  # port 9: discard, nothing listens


def _script(tmp_path: Path, body: str) -> List[str]:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie no one has reaped yet has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# ----------------------------------------------------------------------------- 6. workers never keep a process alive

@pytest.mark.slow
def test_a_script_holding_a_loader_iterator_at_exit_does_not_hang(tmp_path: Path) -> None:
    # multiprocessing's exit handler SIGTERMs the workers of the iterator still held in the
    # global and joins them: workers that ignored every SIGTERM hung the script forever.
    cmd = _script(tmp_path, """
        from scale.config import DataConfig
        from scale.data import LoaderSpec, build_dataset

        data = build_dataset(DataConfig(name="synthetic", num_samples=64, mean=[0.5], std=[0.25]), 28, 1)
        batches = iter(data.loader(LoaderSpec(batch_size=8, seed=0, num_workers=2), 0))
        images, labels, _ = next(batches)
        print("one batch", tuple(images.shape), flush=True)
        """)
    proc = subprocess.Popen(cmd, env=python_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "one batch (8, 1, 28, 28)"
        returned = time.monotonic()
        proc.wait(timeout=60)
        assert time.monotonic() - returned < 20
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()[-3000:]


@pytest.mark.slow
def test_workers_stuck_in_a_read_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    # torch's own parent check runs between fetches only; a worker blocked in a read never gets to it.
    cmd = _script(tmp_path, """
        import multiprocessing, os, signal, time
        from torch.utils.data import Dataset
        from scale.data import LoaderSpec
        from scale.data.device_input import DeviceInput
        from scale.data.map_style import MapStyleData

        class StuckReads(Dataset):
            def __len__(self):
                return 64

            def __getitem__(self, index):
                time.sleep(600)  # a read that never returns (a dead network file system)

        data = MapStyleData(StuckReads(), None, DeviceInput([0.5], [0.25]))
        batches = data.loader(LoaderSpec(batch_size=8, seed=0, num_workers=2), 0)
        time.sleep(2)  # the workers are in their first read
        print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    # Output to a file: surviving workers would hold a pipe open and keep run() waiting.
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.run(cmd, env=python_env(), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, timeout=120)
    output = (tmp_path / "out.txt").read_text()
    workers = [int(pid) for pid in output.splitlines()[-1].split()] if output.strip() else []
    assert proc.returncode == -signal.SIGKILL and len(workers) == 2, output[-3000:]
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers)
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("ending", ["iterator_shut_down", "worker_stuck_then_terminated"])
@pytest.mark.slow
def test_a_workers_own_children_end_with_it(tmp_path: Path, ending: str) -> None:
    # A `pipe:` shard's reader (curl, cat) is the worker's child: a worker that ended, or was
    # terminated by torch after its join timed out, left it running on, reparented.
    cmd = _script(tmp_path, f"""
        import os, subprocess, time
        from torch.utils.data import Dataset
        from scale.data import LoaderSpec
        from scale.data.device_input import DeviceInput
        from scale.data.map_style import MapStyleData

        class SpawnsReaders(Dataset):
            readers = []

            def __len__(self):
                return 64

            def __getitem__(self, index):
                reader = subprocess.Popen(["sh", "-c", "sleep 600; true"])  # sh stays: the sleep is a grandchild
                self.readers.append(reader)
                with open("readers.txt", "a") as out:
                    out.write(f"{{reader.pid}}\\n")
                if {ending == "worker_stuck_then_terminated"} and index >= 8:
                    time.sleep(600)
                return 0

        data = MapStyleData(SpawnsReaders(), None, DeviceInput([0.5], [0.25]))
        batches = data.loader(LoaderSpec(batch_size=8, seed=0, num_workers=2), 0)
        time.sleep(1.5)  # the workers have started their readers
        del batches
        print("ended", flush=True)
        """)
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.run(cmd, env=python_env(), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, timeout=120)
    output = (tmp_path / "out.txt").read_text()
    readers = [int(pid) for pid in (tmp_path / "readers.txt").read_text().split()]
    sleeps = [int(pid) for pid in subprocess.run(["pgrep", "-f", "^sleep 600$"], capture_output=True,
                                                 text=True).stdout.split()]
    try:
        assert proc.returncode == 0 and "ended" in output, output[-3000:]
        assert readers
        assert not any(_alive(pid) for pid in readers + sleeps)
    finally:
        for pid in readers + sleeps:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- 5. a dead data source is an error

def _train_until_exit(tmp_path: Path, *overrides: str) -> Tuple[int, List[str], float, List[str]]:
    """Run scale-train in its own process group; (exit status, stderr lines, seconds from the
    error line to the exit, processes of the group left afterwards)."""
    cmd = [sys.executable, "-m", "scale.train", *tiny_overrides(f"train.output_dir={tmp_path / 'run'}", *overrides)]
    with open(tmp_path / "stdout.txt", "w") as stdout:
        proc = subprocess.Popen(cmd, env=python_env(), cwd=tmp_path, stdout=stdout, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            lines, error_at = [], None
            for line in proc.stderr:  # ends when every process holding stderr has closed it
                lines.append(line.rstrip("\n"))
                if ": error: " in line:
                    error_at = time.monotonic()
                    break
            proc.wait(timeout=60)
            lines += proc.stderr.read().splitlines()
            seconds = time.monotonic() - (error_at or time.monotonic())
            left = subprocess.run(["pgrep", "-a", "-g", str(proc.pid)], capture_output=True, text=True).stdout.splitlines()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, lines, seconds, left


def _the_one_error(returncode: int, lines: List[str]) -> str:
    assert returncode == 2, (returncode, lines[-20:])
    assert not any("Traceback" in line for line in lines), lines
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, lines
    return errors[0]


@pytest.mark.parametrize("workers,root", [
    pytest.param(0, UNREACHABLE_URL, marks=NO_CURL, id="in_process-unreachable_url"),
    pytest.param(1, "pipe:false", id="one_worker-failing_pipe"),
    pytest.param(2, UNREACHABLE_URL, marks=NO_CURL, id="two_workers-unreachable_url"),
    pytest.param(2, "pipe:cat {tmp}/absent-{000000..000003}.tar", id="two_workers-pipe_of_missing_files"),
])
@pytest.mark.slow
def test_a_dead_resampled_source_exits_2_within_seconds_of_its_line(tmp_path: Path, workers: int, root: str) -> None:
    root = root.replace("{tmp}", str(tmp_path))
    returncode, lines, seconds, left = _train_until_exit(
        tmp_path, "data.name=webdataset", f"data.root={root}", "data.resampled=true", f"data.num_workers={workers}")
    error = _the_one_error(returncode, lines)
    assert error.startswith(f"scale-train: error: data.root {root!r}: ") and "shard read errors in a row" in error
    assert " at 0x" not in error  # no object addresses in the message
    assert seconds < 15, seconds
    assert left == []  # no worker outlives the trainer


@pytest.mark.slow
def test_a_batch_of_only_corrupt_samples_stops_the_run(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", [40, 40], broken={i: "garbage" for i in range(80)})
    returncode, lines, _, _ = _train_until_exit(
        tmp_path, "data.name=webdataset", f"data.root={tmp_path / 'shards'}", "data.num_workers=1")
    error = _the_one_error(returncode, lines)
    assert f"data.root '{tmp_path / 'shards'}': every sample of a batch of 32 is corrupt" in error
    assert f"(first: {tmp_path / 'shards'}/train-00000" in error and " key train-00000" in error
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_an_image_folder_batch_of_only_unreadable_images_is_a_user_error(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / "root" / "cls").mkdir(parents=True, exist_ok=True)
        (tmp_path / "root" / "cls" / f"{i}.jpg").write_bytes(b"junk")
    for workers in (0, 1):
        with pytest.raises(UserError, match="every sample of batch 0 of epoch 0 .4 samples. is unreadable") as err:
            collect(folder(tmp_path / "root"), LoaderSpec(batch_size=4, seed=0, num_workers=workers), 0)
        assert str(err.value).startswith("data.root: ") and "\n" not in str(err.value)


def test_a_device_decoded_batch_of_only_corrupt_jpegs_is_a_user_error() -> None:
    # Cut JPEGs: their headers parse, so the worker ships them; the device (and PIL) reject every one.
    items = DeviceJpegItems(PretrainTransform(32, 3))
    cut = [data[: len(data) // 2] for data in (jpeg(photo(80 + 8 * i, 60, seed=i)) for i in range(3))]
    batch = items.collate([items(data, seed) for seed, data in enumerate(cut)])
    with pytest.raises(UserError, match="^data.root: every image of a batch of 3 is a corrupt JPEG"):
        DeviceInput([0.5] * 3, [0.25] * 3).pixels(batch, torch.device("cpu"))


# ----------------------------------------------------------------------------- 5. pipe: roots

def _fashion_mnist_shards(tmp_path: Path) -> Path:
    """Shards as the project's converter writes them: 12 samples in shards of 5, 5 and 2."""
    make_tiny_fashion_mnist(tmp_path / "fmnist")
    assert fashion_mnist.main(["--src", str(tmp_path / "fmnist"), "--out", str(tmp_path / "wds"),
                               "--shard-size", "5", "--workers", "1"]) == 0
    return tmp_path / "wds" / "train"


def _batches(**fields) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    data = build_dataset(DataConfig(name="webdataset", mean=[0.5], std=[0.25], shuffle_buffer=4, **fields), 28, 1)
    return collect(data, LoaderSpec(batch_size=2, seed=0), 1)


@pytest.mark.slow
def test_a_pipe_root_without_a_url_in_it_reads_the_same_batches_as_the_directory(tmp_path: Path) -> None:
    train = _fashion_mnist_shards(tmp_path)
    piped = f"pipe:cat {train}/train-{{000000..000002}}.tar"
    for index in train.glob("*.idx.json"):  # the directory then streams too (indexed shards are read by sample)
        index.unlink()
    expected = _batches(root=str(train))
    got = _batches(root=piped, manifest=str(train / "manifest.json"))  # finite mode: counts from the manifest
    assert len(got) == len(expected) == 6  # every sample of the 12
    for (x, y), (x_expected, y_expected) in zip(got, expected):
        assert torch.equal(y, y_expected) and torch.equal(x, x_expected)
    resampled = _batches(root=piped, resampled=True, num_samples=8)  # no manifest needed
    assert [len(y) for _, y in resampled] == [2, 2, 2, 2]


def test_pipe_roots_without_counts_say_how_to_give_them(tmp_path: Path) -> None:
    train = _fashion_mnist_shards(tmp_path)
    piped = f"pipe:cat {train}/train-{{000000..000002}}.tar"
    for fields, expected in ((dict(root=piped), "expected a manifest.json next to the shards (or set data.manifest)"),
                             (dict(val_root=piped), "expected local shards with their manifest.json next to them")):
        with pytest.raises(UserError, match="finite mode needs per-shard sample counts") as err:
            build_dataset(DataConfig(name="webdataset", mean=[0.5], std=[0.25], **fields), 28, 1, train="root" in fields)
        assert expected in str(err.value)
