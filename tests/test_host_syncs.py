"""A step that logs nothing never waits for the device (issue 28, point 2).

A device-to-host read (`.item()`, `bool(tensor)`, a data-dependent shape) stalls the host until
the device has run everything queued before it, so the loop reads the device only at log and
checkpoint steps. On the CPU the profiler records such a read as `aten::_local_scalar_dense`
(or the op that asks for it); a step between two log steps must record none. `.cpu()` and
`.tolist()` of a tensor already on the CPU dispatch nothing, so this test cannot see them:
`bench/gpu_check.py` runs its CUDA steps under `torch.cuda.set_sync_debug_mode("error")`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

if __name__ == "__main__":  # torchrun runs this file as the DDP test's worker
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from conftest import REPO, python_env, tiny_overrides
from scale.config import load_config
from scale.engine import StepTimer
from scale.trainer import Trainer
from scale.trainer.watchdog import DATA_WAIT, FORWARD_BACKWARD

# Ops that read a tensor's value on the host, or size a result by the data: each syncs on CUDA.
HOST_READS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero",
                        "aten::masked_select", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive"})
QUIET_STEP = 3  # of 4: steps 1-2 warm up, step 4 is the run's last (a log step)


def quiet_run(tmp_path, recipe: str, *overrides: str):
    """`recipe` on synthetic data, 4 steps of 8 images, logging and checkpointing at the last step only."""
    return load_config(str(REPO / "recipes" / recipe), tiny_overrides(
        f"train.output_dir={tmp_path / 'run'}", "data.name=synthetic", "data.num_samples=32", "train.micro_batch=8",
        "train.epochs=1", "train.log_every=100", "train.ckpt_every=100", *overrides))


def host_reads_of_a_quiet_step(trainer: Trainer) -> Counter:
    """Host reads from the moment step QUIET_STEP starts to the moment the loop waits for the next batch:
    the step, its metrics, the divergence record, the watchdog and the stop check, not data loading."""
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    enter = trainer.watchdog.enter
    profiling = []

    def enter_and_profile(phase: str, step: int) -> None:
        if phase == FORWARD_BACKWARD and step == QUIET_STEP:
            profiler.start()
            profiling.append(step)
        elif phase == DATA_WAIT and step == QUIET_STEP + 1 and profiling:
            profiler.stop()
        enter(phase, step)

    trainer.watchdog.enter = enter_and_profile
    summary = trainer.fit()
    assert profiling and summary.final_step == QUIET_STEP + 1 and not trainer.logs_at(QUIET_STEP)
    return Counter(event.name for event in profiler.events() if event.name in HOST_READS and not in_adamw(event))


def in_adamw(event) -> bool:
    """Whether `event` ran inside torch's AdamW.step. Its per-parameter step count lives in host memory for the
    loop and foreach kernels, and the CPU's fused kernel reads it there too: on the CPU those reads are this op,
    on CUDA no device read (the fused kernel, the default there, keeps the count on the device)."""
    while event is not None:
        if event.name.startswith("Optimizer.step#"):
            return True
        event = event.cpu_parent
    return False


@pytest.mark.slow
@pytest.mark.parametrize("recipe, overrides", [
    ("ocl_cpu_tiny.yaml", ()),
    ("ocl_cpu_tiny.yaml", ("train.global_batch=8", "train.micro_batch=4", "optim.clip_grad=1.0")),  # gradient caching
    ("mae_fashion_mnist_cpu.yaml", ()),
    ("mae_fashion_mnist_cpu.yaml", ("train.global_batch=8", "train.micro_batch=4")),  # accumulation
    ("asl_fashion_mnist_cpu.yaml", ()),
    ("ehm_fashion_mnist_cpu.yaml", ()),
], ids=["ocl", "ocl-grad-cache", "mae", "mae-accumulate", "asl", "ehm"])
def test_a_step_that_logs_nothing_reads_nothing_from_the_device(tmp_path, recipe, overrides):
    assert host_reads_of_a_quiet_step(Trainer(quiet_run(tmp_path, recipe, *overrides))) == Counter()


def test_the_step_timer_synchronises_cuda_only_in_measured_steps(monkeypatch):
    """StepTimer times a CUDA region by synchronising around it: only in the steps the trainer logs."""
    synchronised = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronised.append(device))
    timer = StepTimer(torch.device("cuda"), sync=True)
    for measured in (False, True, False):
        timer.begin_step(measured)
        with timer.time("optimizer"):
            pass
        assert "optimizer" in timer.pop()
    assert len(synchronised) == 2  # the measured step's region: its start and its end


def test_the_trainer_measures_the_steps_it_logs(tmp_path, monkeypatch):
    """train.log_every=2 over 4 steps: the timer synchronises in steps 2 and 4 only."""
    trainer = Trainer(quiet_run(tmp_path, "ocl_cpu_tiny.yaml", "train.log_every=2"))
    flags = []
    begin_step = trainer.timer.begin_step
    monkeypatch.setattr(trainer.timer, "begin_step", lambda measured: (flags.append(measured), begin_step(measured)))
    trainer.fit()
    assert flags == [False, True, False, True]


def test_gpu_check_runs_the_steps_that_do_not_log_with_cuda_syncs_as_errors(monkeypatch):
    """bench/gpu_check.py's no_host_sync: set_sync_debug_mode("error") on CUDA for the step, restored after;
    nothing on the CPU."""
    import bench.gpu_check as gpu_check

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with gpu_check.no_host_sync(torch.device("cuda")):
        assert modes == ["error"]
    assert modes == ["error", 0]
    with gpu_check.no_host_sync(torch.device("cuda"), enabled=False), gpu_check.no_host_sync(torch.device("cpu")):
        pass
    assert modes == ["error", 0]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.long
def test_a_ddp_step_that_logs_nothing_reads_nothing_from_the_device(tmp_path):
    """Two gloo ranks (this file as the torchrun worker): DDP's gradient all-reduce and the mean of the
    step's metrics over the ranks are collectives, not host reads."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(tmp_path)]
    env = python_env({"OMP_NUM_THREADS": "1", "SCALE_TEST_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"host_reads_rank{rank}.json").read_text()) == {}


if __name__ == "__main__":  # the DDP test's worker, one process per rank under torchrun
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    trainer = Trainer(quiet_run(out, "ocl_cpu_tiny.yaml", "engine.name=ddp", "train.global_batch=16",
                                "data.num_samples=64"))
    (out / f"host_reads_rank{rank}.json").write_text(json.dumps(host_reads_of_a_quiet_step(trainer)))
