"""Divergence (scale/trainer/divergence.py): a non-finite loss or grad norm is one line and exit 5
(train.on_nonfinite=stop), or a rollback to the last good checkpoint that skips the diverged batches
and records them (rollback), up to train.max_rollbacks.

The fast tests drive the check on a single-process engine; the slow ones make one rank train on NaN
pixels at a step (SCALE_TEST_NONFINITE_AT=RANK:STEP), in one process and on two gloo ranks.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from scale import demo
from scale.checkpoint_io.model_state import load_checkpoint
from scale.config import ConfigError, load_config
from scale.engine import SingleProcessEngine
from scale.errors import DIVERGED_EXIT, USER_ERROR_EXIT, Diverged, UserError, run_command
from scale.trainer import Trainer
from scale.trainer.divergence import ROLLBACKS_FILE, DivergenceGuard, NonFinite, read_rollbacks

from conftest import tiny_config
from test_watchdog import RUN, launch, lines_with

NAN, INF = float("nan"), float("inf")
SHORT = ("data.num_samples=64", "train.micro_batch=16", "train.log_every=2", "train.ckpt_every=2")


def guard(tmp_path: Path, policy: str = "rollback", max_rollbacks: int = 2) -> DivergenceGuard:
    return DivergenceGuard(SingleProcessEngine(torch.device("cpu")), policy, max_rollbacks, tmp_path)


def step_values(guard: DivergenceGuard, step: int, loss: float, grad_norm: float) -> None:
    guard.record(step, {"loss": torch.tensor(loss), "grad_norm": torch.tensor(grad_norm)})


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


# ----------------------------------------------------------------------------- the check and the decision

def test_the_check_finds_the_first_nonfinite_step_since_the_last_check(tmp_path):
    g = guard(tmp_path)
    assert g.check(found_at=0) is None  # nothing pending
    step_values(g, 1, 2.5, 1.0)
    step_values(g, 2, 2.4, 0.9)
    assert g.check(found_at=2) is None
    step_values(g, 3, 2.3, INF)  # the grad norm goes first, the loss follows
    step_values(g, 4, NAN, NAN)
    assert g.check(found_at=4) == NonFinite(step=3, value="grad_norm", number=INF, found_at=4)
    assert g.check(found_at=4) is None  # checked values are not checked again
    step_values(g, 5, NAN, 1.0)
    assert g.check(found_at=5) == NonFinite(step=5, value="loss", number=pytest.approx(NAN, nan_ok=True), found_at=5)


def test_stop_is_one_line_naming_the_step_value_and_last_checkpoint(tmp_path):
    bad = NonFinite(step=3, value="loss", number=NAN, found_at=4)
    with pytest.raises(Diverged) as stopped:
        guard(tmp_path, "stop").decide(bad, tmp_path / "checkpoints" / "step_00000002")
    line = str(stopped.value)
    assert "\n" not in line and "loss is nan at step 3 (found at step 4)" in line and "step_00000002" in line
    with pytest.raises(Diverged, match="no checkpoint to roll back to"):
        guard(tmp_path).decide(bad, None)
    assert not (tmp_path / ROLLBACKS_FILE).exists()


def test_rollbacks_are_recorded_skipped_and_limited(tmp_path):
    g = guard(tmp_path, max_rollbacks=2)
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    g.decide(NonFinite(3, "loss", NAN, 4), ckpt)
    g.decide(NonFinite(7, "grad_norm", INF, 8), ckpt)
    assert [g.skips(step) for step in range(1, 10)] == [False, False, True, True, False, False, True, True, False]
    with pytest.raises(Diverged, match=r"after 2 rollback\(s\), train.max_rollbacks=2"):
        g.decide(NonFinite(9, "loss", NAN, 10), ckpt)
    # A later run (a resume) reads them again: it skips the same steps and counts the same rollbacks.
    again = guard(tmp_path, max_rollbacks=2)
    assert [r["skipped"] for r in again.load(resumed=True)] == [[3, 4], [7, 8]]
    assert again.skips(8) and not again.skips(5)
    with pytest.raises(Diverged):
        again.decide(NonFinite(11, "loss", NAN, 12), ckpt)


def test_a_hostile_skipped_range_costs_no_memory(tmp_path):
    # A range of 10^12 steps was once expanded into a set of every step: a MemoryError, not a run.
    (tmp_path / ROLLBACKS_FILE).write_text('{"rollbacks": [{"skipped": [1, 1000000000000]}]}')
    g = guard(tmp_path, max_rollbacks=2)
    assert g.load(resumed=True)[0]["skipped"] == [1, 1000000000000]
    assert g.skips(5) and g.skips(10 ** 12) and not g.skips(10 ** 12 + 1)


@pytest.mark.parametrize("content", ["{not json", '{"rollbacks": [{"skipped": [4, 3]}]}', '{"rollbacks": 3}', "[]",
                                     '{"rollbacks": [{"skipped": [true, true]}]}', "[" * 100_000])
def test_a_damaged_rollback_record_is_one_line(tmp_path, content):
    path = tmp_path / ROLLBACKS_FILE
    path.write_text(content)
    with pytest.raises(UserError, match="rollbacks.json: not a rollback record scale wrote") as refused:
        read_rollbacks(path)
    assert "\n" not in str(refused.value)


def test_a_fresh_run_refuses_a_leftover_rollback_record(tmp_path):
    """rollbacks.json names steps of the run whose checkpoints it rolled back to: only a resume of that run
    skips them. A fresh run (no checkpoint resumed, also with --resume auto) is refused in one line."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ROLLBACKS_FILE).write_text(json.dumps({"rollbacks": [{"skipped": [1, 1]}]}))
    for resume in ([], ["train.resume=auto"]):
        cfg = tiny_config(tmp_path, "train.max_steps=1", "train.on_nonfinite=rollback", *resume)
        with pytest.raises(UserError, match="records the rollbacks of an earlier run, but this run starts afresh") \
                as refused:
            Trainer(cfg).fit()
        assert "\n" not in str(refused.value) and str(run / ROLLBACKS_FILE) in str(refused.value)
    assert not (run / "checkpoints").exists()  # refused before training
    assert guard(tmp_path / "elsewhere").load(resumed=False) == []  # no leftover: a fresh run starts


def test_every_command_that_trains_reports_a_divergence_in_one_line_and_exit_5(monkeypatch, capsys):
    line = "diverged: loss is nan at step 3 (found at step 4); last good checkpoint: run/checkpoints/step_00000002"

    def diverge(*_args):
        raise Diverged(line)

    monkeypatch.setattr(demo, "_demo", diverge)  # `make demo` trains through Trainer.fit like scale-train
    assert demo.main([]) == DIVERGED_EXIT
    assert capsys.readouterr().err == f"scale.demo: {line}\n"
    assert run_command("scale-train", diverge) == DIVERGED_EXIT
    assert capsys.readouterr().err == f"scale-train: {line}\n"

    def diverge_elsewhere():  # every rank raises it; only the main rank says it
        raise Diverged(line, report=False)

    assert run_command("scale-train", diverge_elsewhere) == DIVERGED_EXIT
    assert capsys.readouterr().err == ""

    def refuse():
        raise UserError("train.x: wrong")

    assert run_command("scale-train", refuse) == USER_ERROR_EXIT  # user errors are unchanged


def test_the_divergence_keys_are_checked():
    with pytest.raises(ConfigError, match="train.on_nonfinite must be stop or rollback"):
        load_config(None, ["train.on_nonfinite=skip"])
    with pytest.raises(ConfigError, match="train.max_rollbacks has no effect: train.on_nonfinite is stop"):
        load_config(None, ["train.max_rollbacks=5"])
    with pytest.raises(ConfigError, match=r"train.max_rollbacks must be in \[0, inf\]"):
        load_config(None, ["train.on_nonfinite=rollback", "train.max_rollbacks=-1"])
    assert load_config(None, ["train.on_nonfinite=rollback", "train.max_rollbacks=5"]).train.max_rollbacks == 5


# ----------------------------------------------------------------------------- injected divergence, one process

@pytest.mark.slow
def test_stop_exits_5_with_one_line_and_no_traceback(tmp_path):
    out = tmp_path / "run"
    [(status, _stdout, stderr)] = launch(out, [*RUN, *SHORT], {"SCALE_TEST_NONFINITE_AT": "0:3"})
    assert status == DIVERGED_EXIT, stderr[-3000:]
    assert "Traceback" not in stderr
    [line] = lines_with(stderr, "diverged")
    assert "loss is nan at step 3 (found at step 4)" in line and str(out / "checkpoints" / "step_00000002") in line
    # Nothing non-finite was checkpointed: the check runs before the checkpoint of step 4.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]


@pytest.mark.slow
def test_rollback_skips_the_diverged_batches_and_a_resume_skips_them_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCALE_TEST_NONFINITE_AT", "0:3")
    cfg = tiny_config(tmp_path, *SHORT, "train.max_steps=6", "train.on_nonfinite=rollback", "train.keep_last=5")
    summary = Trainer(cfg).fit()
    # Step 3 went NaN, step 4's check found it: back to step 2, steps 3-4 skipped, 5 and 6 trained.
    assert summary.final_step == 6 and len(summary.losses) == 4 and all(math.isfinite(x) for x in summary.losses)
    run = Path(cfg.train.output_dir)
    [record] = json.loads((run / ROLLBACKS_FILE).read_text())["rollbacks"]
    assert record["skipped"] == [3, 4] and record["value"] == "loss" and record["checkpoint"].endswith("step_00000002")
    assert "skipping steps 3-4" in capsys.readouterr().out
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 6]  # step 4 was skipped: nothing logged as if it had trained
    for checkpoint in sorted((run / "checkpoints").iterdir()):
        assert all_finite(load_checkpoint(checkpoint).model_state), checkpoint
    # A resume from before the rollback reads rollbacks.json and skips steps 3-4 again: the same model.
    monkeypatch.delenv("SCALE_TEST_NONFINITE_AT")
    resumed = Trainer(tiny_config(tmp_path, *SHORT, "train.max_steps=6", "train.on_nonfinite=rollback",
                                  "train.keep_last=5", f"train.resume={run / 'checkpoints' / 'step_00000002'}")).fit()
    assert resumed.losses == summary.losses[2:]


@pytest.mark.slow
def test_a_rollback_logs_each_step_once(tmp_path, monkeypatch):
    """Lines logged between the checkpoint and the diverged step describe a model the rollback threw away:
    metrics.jsonl forgets them, as on resume, and each step is logged once."""
    monkeypatch.setenv("SCALE_TEST_NONFINITE_AT", "0:4")
    cfg = tiny_config(tmp_path, "data.num_samples=64", "train.micro_batch=16", "train.log_every=1",
                      "train.ckpt_every=2", "train.max_steps=6", "train.on_nonfinite=rollback")
    trainer = Trainer(cfg)
    events = []  # loaders started and closed, in order: the old one's workers end before the new one forks
    loader = trainer.data.loader

    def closing(batches, start_batch):
        try:
            yield from batches
        finally:
            events.append(("closed", start_batch))

    def watched(spec, epoch, start_batch=0):  # as the loaders do, forks its workers when called
        events.append(("start", start_batch))
        return closing(loader(spec, epoch, start_batch), start_batch)

    monkeypatch.setattr(trainer.data, "loader", watched)
    summary = trainer.fit()
    assert events[:3] == [("start", 0), ("closed", 0), ("start", 2)]
    # Steps 1-3 logged, step 4 went NaN and its check found it: back to step 2, step 3 trained again, 4 skipped.
    assert summary.final_step == 6
    run = Path(cfg.train.output_dir)
    [record] = json.loads((run / ROLLBACKS_FILE).read_text())["rollbacks"]
    assert record["skipped"] == [4, 4]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == [1, 2, 3, 5, 6]
    assert all(math.isfinite(line["loss"]) for line in logged)


@pytest.mark.slow
def test_rollbacks_used_up_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALE_TEST_NONFINITE_AT", "0:3,0:5")
    cfg = tiny_config(tmp_path, *SHORT, "train.max_steps=8", "train.on_nonfinite=rollback", "train.max_rollbacks=1")
    with pytest.raises(Diverged, match=r"loss is nan at step 5 \(found at step 6\) after 1 rollback\(s\)"):
        Trainer(cfg).fit()
    [record] = json.loads((Path(cfg.train.output_dir) / ROLLBACKS_FILE).read_text())["rollbacks"]
    assert record["skipped"] == [3, 4]


# ----------------------------------------------------------------------------- two ranks, one of them diverging

TWO_RANKS = [*RUN, *SHORT, "train.micro_batch=8", "train.global_batch=16"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.long
def test_two_ranks_stop_together_with_one_line(tmp_path):
    out = tmp_path / "run"
    results = launch(out, TWO_RANKS, {"SCALE_TEST_NONFINITE_AT": "1:3"}, ranks=2)
    assert [status for status, _, _ in results] == [DIVERGED_EXIT, DIVERGED_EXIT], [r[2][-2000:] for r in results]
    lines = [line for _, _, stderr in results for line in lines_with(stderr, "diverged")]
    assert len(lines) == 1 and "loss is nan at step 3" in lines[0], lines
    assert not any("Traceback" in stderr for _, _, stderr in results)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_roll_back_together_and_finish(tmp_path):
    out = tmp_path / "run"
    results = launch(out, [*TWO_RANKS, "train.max_steps=6", "train.on_nonfinite=rollback"],
                     {"SCALE_TEST_NONFINITE_AT": "1:3"}, ranks=2)
    assert [status for status, _, _ in results] == [0, 0], [r[2][-2000:] for r in results]
    [line] = lines_with(results[0][1], "rollback 1 of at most 3")
    assert "loss is nan at step 3 (found at step 4)" in line and "skipping steps 3-4" in line, line
    [record] = json.loads((out / ROLLBACKS_FILE).read_text())["rollbacks"]
    assert record["skipped"] == [3, 4]
    losses = {json.loads(line)["step"]: json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert sorted(losses) == [2, 6] and all(math.isfinite(x) for x in losses.values())
    assert all_finite(load_checkpoint(out / "checkpoints" / "step_00000006").model_state)
