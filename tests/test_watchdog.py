"""The hang watchdog (scale/trainer/watchdog.py): a rank on which no step completes writes its
threads' stacks, logs one line naming the rank, step and phase, and exits 4.

The fast tests drive the heartbeat with a fake clock; the slow ones inject a hang
(SCALE_TEST_HANG_AT=RANK:STEP) into a real run, one process and two gloo ranks.
"""
from __future__ import annotations

import re
import math
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import pytest
import torch

from scale.config import ConfigError, load_config
from scale.engine import StepTimer
from scale.errors import HANG_EXIT
from scale.trainer import Trainer
from scale.trainer.watchdog import (CHECKPOINT, COLLECTIVE_MARGIN, DATA_WAIT, FLOOR_S, FORWARD_BACKWARD, LONG_PHASE_S,
                                    STEP_FACTOR, HangWatchdog, hang_limit)

from conftest import REPO, TINY_OVERRIDES, tiny_config
from test_distributed import clean_env, free_port
from test_mae import MAE_TINY

# A short run: 4 steps of 16 images; checkpoints at 2 and 4.
RUN = [*TINY_OVERRIDES, "train.micro_batch=16", "train.max_steps=4", "train.log_every=2", "train.ckpt_every=2"]


NO_COLLECTIVE = math.inf  # engine.timeout_s out of the way: the tests of the limits themselves


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def launch(out: Path, overrides: Sequence[str], env: dict, ranks: int = 1, timeout: float = 300) -> List[Tuple[int, str, str]]:
    """`scale-train` as `ranks` processes (torchrun's variables, gloo on CPU); (exit status, stdout,
    stderr) per rank. A run that does not end within `timeout` fails the test."""
    port = free_port()
    procs = []
    for rank in range(ranks):
        launch_env = {"RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank),
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} if ranks > 1 else {}
        procs.append(subprocess.Popen([sys.executable, "-m", "scale.train", *overrides, f"train.output_dir={out}"],
                                      env=clean_env({**launch_env, **env}), cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            results.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def lines_with(text: str, needle: str) -> List[str]:
    return [line for line in text.splitlines() if needle in line]


# ----------------------------------------------------------------------------- the limit and the heartbeat

def test_the_limit_is_sized_from_the_slowest_recent_step_with_a_floor():
    assert hang_limit(None, [], long=False, collective_timeout_s=NO_COLLECTIVE) == FLOOR_S
    assert hang_limit(None, [0.5, 2.0, 1.0], long=False, collective_timeout_s=NO_COLLECTIVE) == FLOOR_S  # the floor
    assert hang_limit(None, [10.0, 90.0, 30.0], long=False, collective_timeout_s=NO_COLLECTIVE) == STEP_FACTOR * 90.0
    assert hang_limit(7.0, [90.0], long=False, collective_timeout_s=NO_COLLECTIVE) == 7.0  # train.hang_timeout_s wins
    # A new loader's first step and checkpoints / monitors get the long allowance, whatever is set.
    assert hang_limit(7.0, [], long=True, collective_timeout_s=NO_COLLECTIVE) == LONG_PHASE_S
    assert hang_limit(None, [1000.0], long=True, collective_timeout_s=NO_COLLECTIVE) == STEP_FACTOR * 1000.0


def test_every_limit_stays_below_the_collective_timeout(tmp_path):
    """A hung rank's peers wait in a collective that fails at engine.timeout_s (exit 1, no stacks, no requeue):
    the watchdog fires first, in the long phases too, and a train.hang_timeout_s that would not is refused."""
    timeout = load_config(None, []).engine.timeout_s
    cap = COLLECTIVE_MARGIN * timeout
    assert cap < timeout <= LONG_PHASE_S  # the default start-up allowance alone would tie with it
    assert hang_limit(None, [], long=True, collective_timeout_s=timeout) == cap
    assert hang_limit(None, [500.0], long=False, collective_timeout_s=timeout) == cap  # 10 x a slow step
    assert hang_limit(7.0, [], long=False, collective_timeout_s=timeout) == 7.0
    assert hang_limit(None, [], long=False, collective_timeout_s=60.0) == 54.0  # below the floor too
    dog = HangWatchdog(tmp_path, rank=0, configured_s=None, collective_timeout_s=timeout, clock=FakeClock())
    with dog.long_phase(CHECKPOINT, 1):
        assert dog.limit() == cap
    with pytest.raises(ConfigError, match=r"train.hang_timeout_s \(1800.0\) must be below engine.timeout_s "
                                          r"\(1800.0\)") as refused:
        load_config(None, ["train.hang_timeout_s=1800"])
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="must be below engine.timeout_s"):
        load_config(None, ["train.hang_timeout_s=100", "engine.timeout_s=60"])
    assert load_config(None, ["train.hang_timeout_s=1800", "engine.timeout_s=3600"]).train.hang_timeout_s == 1800.0


def test_the_heartbeat_measures_steps_not_start_up_or_checkpoints(tmp_path):
    clock = FakeClock()
    dog = HangWatchdog(tmp_path, rank=0, configured_s=None, collective_timeout_s=NO_COLLECTIVE, clock=clock)
    assert dog.limit() == LONG_PHASE_S  # nothing done yet: start-up (compile, workers, data)
    clock.now += 1000.0  # a slow first step is start-up, not a step duration
    dog.step_done(1)
    assert dog.limit() == FLOOR_S and not dog.overdue()
    dog.enter(DATA_WAIT, 2)
    clock.now += 20.0
    dog.step_done(2)
    assert dog.limit() == FLOOR_S  # 10 x 20 s is below the floor
    clock.now += 20.0
    dog.step_done(3)
    clock.now += 200.0
    dog.step_done(4)
    assert dog.limit() == STEP_FACTOR * 200.0
    clock.now += STEP_FACTOR * 200.0 - 1
    assert not dog.overdue()
    clock.now += 2
    assert dog.overdue()


def test_checkpoints_get_their_own_allowance_and_clock(tmp_path):
    clock = FakeClock()
    dog = HangWatchdog(tmp_path, rank=0, configured_s=5.0, collective_timeout_s=NO_COLLECTIVE, clock=clock)
    dog.step_done(1)
    assert dog.limit() == 5.0  # train.hang_timeout_s once the first step is done
    with dog.long_phase(CHECKPOINT, 1):
        clock.now += LONG_PHASE_S - 1  # a slow checkpoint is no hang
        assert not dog.overdue()
    assert not dog.overdue()  # its time is not counted against the next step
    clock.now += 6.0
    assert dog.overdue()
    dog.restart(1)  # a new loader (an epoch, a rollback): start-up again
    assert not dog.overdue() and dog.limit() == LONG_PHASE_S


def test_every_epoch_start_gets_the_start_up_allowance(tmp_path, monkeypatch):
    """Each epoch builds a new loader (workers forked, the first batch read): its first batch is waited for
    under the start-up allowance, not a small train.hang_timeout_s meant for steps."""
    cfg = tiny_config(tmp_path, "data.num_samples=32", "train.micro_batch=16", "train.max_steps=3",
                      "train.hang_timeout_s=60")
    trainer = Trainer(cfg)
    assert trainer.steps_per_epoch == 2
    limits = []  # (epoch, the watchdog's limit when the loader gave its first batch)
    loader = trainer.data.loader

    def watched(spec, epoch, start_batch=0):
        for number, batch in enumerate(loader(spec, epoch, start_batch)):
            if number == 0:
                limits.append((epoch, trainer.watchdog.limit()))
            yield batch

    monkeypatch.setattr(trainer.data, "loader", watched)
    trainer.fit()
    start_up = hang_limit(60.0, [], long=True, collective_timeout_s=cfg.engine.timeout_s)
    assert start_up > 60.0
    assert limits == [(0, start_up), (1, start_up)]


def test_the_phase_names_a_collective_the_step_is_waiting_in(tmp_path):
    timer = StepTimer(torch.device("cpu"))
    dog = HangWatchdog(tmp_path, rank=1, configured_s=5.0, collective_timeout_s=NO_COLLECTIVE, timer=timer,
                       clock=FakeClock())
    dog.enter(FORWARD_BACKWARD, 7)
    # The engines' gradient collectives inside backward have no region of their own: the name says it.
    assert dog.describe_phase() == "forward/backward (including the gradient all-reduce of DDP / FSDP2 / ZeRO)"
    timer.start("allgather_bwd", object())
    assert dog.describe_phase() == "collective (allgather_bwd)"
    timer.pop()
    assert dog.describe_phase() == FORWARD_BACKWARD


@pytest.mark.parametrize("override, message", [
    ("train.hang_timeout_s=0", "train.hang_timeout_s must be in [1, inf) or null"),
    ("train.hang_timeout_s=-3", "train.hang_timeout_s must be in [1, inf) or null"),
    ("train.hang_timeout_s=0.001", "train.hang_timeout_s must be in [1, inf) or null"),  # milliseconds by mistake
    ("train.hang_timeout_s=1e-300", "train.hang_timeout_s must be in [1, inf) or null"),
])
def test_hang_timeout_is_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
    assert load_config(None, ["train.hang_timeout_s=90"]).train.hang_timeout_s == 90.0
    assert load_config(None, ["train.hang_timeout_s=1"]).train.hang_timeout_s == 1.0


# ----------------------------------------------------------------------------- an injected hang

@pytest.mark.slow
def test_a_hung_step_writes_the_stacks_logs_one_line_and_exits_4(tmp_path):
    out = tmp_path / "run"
    [(status, _stdout, stderr)] = launch(out, [*RUN, "train.hang_timeout_s=3"], {"SCALE_TEST_HANG_AT": "0:3"},
                                         timeout=180)
    assert status == HANG_EXIT, stderr[-3000:]
    [line] = lines_with(stderr, "hang:")
    assert "rank 0" in line and "step 3" in line and "phase forward/backward" in line, line
    assert "Traceback" not in stderr
    stacks = (out / "hang" / "rank_0_step_3.txt").read_text()
    assert "hang_injected_for_test" in stacks and "Thread" in stacks  # every thread, the stuck one included
    assert str(out / "hang" / "rank_0_step_3.txt") in line


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("objective, waiting_phase", [
    ((), "collective (allgather_fwd)"),  # OCL all-gathers the embeddings in forward: rank 0 waits there
    # MAE's first collective is DDP's gradient all-reduce, inside backward
    pytest.param(MAE_TINY, FORWARD_BACKWARD, marks=pytest.mark.long),
], ids=["ocl", "mae"])
def test_a_rank_hung_on_two_ranks_ends_the_job_with_4_and_its_stacks(tmp_path, objective, waiting_phase):
    """Rank 1 stops at step 3; rank 0 waits for it in a collective. Both watchdogs fire (the
    collective's own timeout, engine.timeout_s, is 30 minutes) and the hung rank's stacks name the stop."""
    out = tmp_path / "run"
    results = launch(out, [*RUN, *objective, "train.micro_batch=8", "train.global_batch=16", "train.hang_timeout_s=4"],
                     {"SCALE_TEST_HANG_AT": "1:3"}, ranks=2, timeout=240)
    assert [status for status, _, _ in results] == [HANG_EXIT, HANG_EXIT], [r[2][-2000:] for r in results]
    lines = []
    for rank, (_status, _stdout, stderr) in enumerate(results):
        [line] = lines_with(stderr, "hang:")
        assert f"rank {rank} " in line and "step 3" in line, line
        lines.append(line)
    assert f"in phase {waiting_phase} for" in lines[0], lines[0]  # the phase rank 0 waits for rank 1 in
    hung = (out / "hang" / "rank_1_step_3.txt").read_text()
    assert "hang_injected_for_test" in hung
    waiting = (out / "hang" / "rank_0_step_3.txt").read_text()
    assert "hang_injected_for_test" not in waiting
