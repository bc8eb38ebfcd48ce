"""A dead or hopeless data source ends the run (exit 2, one line) instead of hanging it, and
DataLoader workers never keep a process alive (issue 25, points 5 and 6)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List

from conftest import python_env


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

def test_a_script_holding_a_loader_iterator_at_exit_does_not_hang(tmp_path: Path) -> None:
    # multiprocessing's exit handler SIGTERMs the workers of the iterator still held in the
    # global and joins them: workers that ignored every SIGTERM hung the script forever.
    cmd = _script(tmp_path, """
        from scale.config import DataConfig
        from scale.data import LoaderSpec, build_dataset

        data = build_dataset(DataConfig(name="synthetic", num_samples=64, mean=[0.5], std=[0.25]), 28, 1)
        batches = iter(data.loader(LoaderSpec(batch_size=8, seed=0, num_workers=2), 0))
        images, labels = next(batches)
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
