"""`make demo` stops when asked: SIGTERM or Ctrl-C checkpoints and stops within seconds (no evaluation
afterwards), says how to continue, and the same command continues that run in the same directory."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scale import demo

ROOT = Path(__file__).resolve().parents[1]
# Synthetic data (the demo's fallback): 20 steps of 32 images, logged every step.
TINY = ["data.num_samples=640", "train.epochs=1", "train.micro_batch=32", "train.log_every=1", "eval.micro_batch=64"]
DRIVER = ("import sys\nfrom scale import demo\n"
          "demo.ensure_fashion_mnist = lambda: 'not installed in this test'\n"
          "sys.exit(demo.main(sys.argv[1:]))\n")


def run_demo(out: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, "--output-dir", str(out), *TINY, *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float) -> list:
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError("the demo ended before " + pattern + ":\n" + "".join(lines))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.long),
                                 pytest.param(signal.SIGTERM, marks=pytest.mark.long)], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_demo_checkpoints_stops_in_seconds_and_the_same_command_continues(tmp_path, sig):
    out = tmp_path / "demo"
    # A terminal's Ctrl-C (and SLURM's SIGTERM) reach the whole process group: loader workers too.
    proc = run_demo(out, "data.num_workers=1", start_new_session=True)
    try:
        lines = wait_for_line(proc, r"^step 2/20 ", timeout=600)
        os.killpg(proc.pid, sig)
        signalled = time.monotonic()
        rest, _ = proc.communicate(timeout=120)
        seconds = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines) + rest
    assert proc.returncode == demo.STOPPED_EXIT, text
    assert seconds < 60, text  # one step and a checkpoint; no kNN, no baselines
    assert "Traceback" not in text and "scoring the baselines" not in text and "kNN top-1" not in text, text
    stopped = re.search(r"demo: stopped at step (\d+) \(checkpoint (\S+)\); run `make demo` again", text)
    assert stopped, text
    assert Path(stopped.group(2)).is_dir() and int(stopped.group(1)) < 20

    again, _ = run_demo(out, "data.num_workers=1").communicate(timeout=900)
    assert f"continuing the unfinished run in {out}" in again, again
    assert f"resumed from {stopped.group(2)}" in again, again
    assert "demo: what the encoder learnt" in again and "Traceback" not in again, again
    assert not (tmp_path / "demo-2").exists()
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 20  # continued, not started over
    assert json.loads((out / demo.DEMO_STATE).read_text())["finished"] is True


@pytest.mark.slow
def test_sigterm_while_evaluating_stops_at_once_and_the_rerun_finishes_the_evaluation(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "ensure_fashion_mnist", lambda: "not installed in this test")
    args = ["--output-dir", str(tmp_path / "demo"), *TINY, "data.num_workers=0"]
    scored = []

    def signalled_while_scoring(cfg):
        scored.append(cfg)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the baselines, after training finished
        time.sleep(1)
        raise AssertionError("SIGTERM did not stop the demo")

    monkeypatch.setattr(demo, "random_init_encoder", signalled_while_scoring)
    assert demo.main(args) == demo.STOPPED_EXIT
    out = capsys.readouterr().out
    assert len(scored) == 1 and "demo: stopped at step 20" in out and "run `make demo` again" in out
    assert "what the encoder learnt" not in out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    monkeypatch.undo()
    monkeypatch.setattr(demo, "ensure_fashion_mnist", lambda: "not installed in this test")
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "continuing the unfinished run" in out and "what the encoder learnt" in out
    assert not (tmp_path / "demo-2").exists()


def test_a_finished_or_foreign_run_is_never_continued(tmp_path):
    plan = {"recipe": "ocl_cpu_tiny", "overrides": ["train.epochs=6"]}
    wanted = tmp_path / "demo"
    demo.write_demo_state(wanted, plan, finished=True)
    assert demo.output_dir_for(wanted, plan) == (tmp_path / "demo-2", False)
    demo.write_demo_state(tmp_path / "demo-2", {**plan, "overrides": ["train.epochs=1"]}, finished=False)
    assert demo.output_dir_for(wanted, plan) == (tmp_path / "demo-3", False)  # another plan: not ours to continue
    (tmp_path / "demo-3" / "checkpoints" / "step_00000001").mkdir(parents=True)  # a run the demo did not write
    assert demo.output_dir_for(wanted, plan) == (tmp_path / "demo-4", False)
    demo.write_demo_state(tmp_path / "demo-2", plan, finished=False)
    assert demo.output_dir_for(wanted, plan) == (tmp_path / "demo-2", True)
