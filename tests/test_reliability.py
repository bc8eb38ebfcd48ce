"""The promises of docs/reliability.md: untrusted files never run code, signals as SLURM sends
them, exact resume, durable checkpoints that fail over, resume config checks, one-line user errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_OVERRIDES, python_env, tiny_config
from scale.checkpoint_io.directory import (FILES_KEY, META, CheckpointError, CheckpointManager, read_meta,
                                          seal_directory)
from scale.trainer import Trainer


def _cli(out: Path, *extra: str) -> list:
    return [sys.executable, "-m", "scale.train", *TINY_OVERRIDES, f"train.output_dir={out}", *extra]


def _run(cmd, cwd, timeout=300):
    return subprocess.run(cmd, env=python_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


class _CreatesFile:
    """Unpickling this creates a file: what a crafted checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _reseal(ckpt: Path) -> None:
    """An attacker rewrites meta.json's checksums too: the load itself must refuse."""
    meta = json.loads((ckpt / META).read_text())
    meta[FILES_KEY] = seal_directory(ckpt)
    del meta[FILES_KEY][META]
    (ckpt / META).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 4-step tiny run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(root, "train.max_steps=4", "train.ckpt_every=2", "train.keep_last=3")
    summary = Trainer(cfg).fit()
    return root / "run", summary


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- 1. loading never runs code

@pytest.mark.slow
def test_crafted_checkpoint_is_refused_by_resume_export_and_eval(trained_run, tmp_path):
    run = _copy_run(trained_run[0], tmp_path / "run")
    ckpt = run / "checkpoints/step_00000004"
    marker = tmp_path / "pwned"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["extra"]["payload"] = _CreatesFile(marker)
    torch.save(state, ckpt / "state.pt")
    _reseal(ckpt)

    resume = _run(_cli(run, "train.max_steps=6", "train.ckpt_every=2", "train.keep_last=3", "--resume",
                       str(ckpt)), tmp_path)
    _one_line_error(resume, "state.pt", "refused")
    export = _run([sys.executable, "-m", "scale.export", "--checkpoint", str(ckpt), "--out",
                   str(tmp_path / "x.safetensors")], tmp_path)
    _one_line_error(export, "state.pt", "refused")
    knn = _run([sys.executable, "-m", "scale.eval", "knn", "--checkpoint", str(ckpt), "--no-progress"], tmp_path)
    _one_line_error(knn, "state.pt", "refused")
    assert not marker.exists()
    assert not (tmp_path / "x.safetensors").exists()


def test_crafted_fsdp_checkpoint_files_are_refused(tmp_path):
    """A DCP checkpoint: its real metadata with a crafted extra.pt, then a crafted .metadata pickle."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from scale.errors import UserError
    from scale.export import load_checkpoint

    ckpt = tmp_path / "step_00000001"
    dcp.save({"model": {"encoder.w": torch.randn(3, 4)}}, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    marker = tmp_path / "pwned"
    torch.save({"config": _CreatesFile(marker)}, ckpt / "extra.pt")
    with pytest.raises(UserError, match="extra.pt"):
        load_checkpoint(ckpt)
    torch.save({"step": 1}, ckpt / "extra.pt")
    assert load_checkpoint(ckpt).model_state["encoder.w"].shape == (3, 4)  # the real metadata still loads
    (ckpt / "dcp/.metadata").write_bytes(pickle.dumps(_CreatesFile(marker)))
    with pytest.raises(UserError, match=r"\.metadata"):
        load_checkpoint(ckpt)
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. signals to the process group

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_process_group_with_workers_checkpoints_and_exits_3(tmp_path, sig):
    out = tmp_path / "run"
    cmd = _cli(out, "data.num_workers=2", "data.num_samples=2048", "train.epochs=20", "train.ckpt_every=1000")
    proc = subprocess.Popen(cmd, env=python_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its own process group, as a SLURM step
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 3, children  # the trainer and its two DataLoader workers
    os.killpg(proc.pid, sig)  # what scancel / slurmstepd do: every process of the step
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 3, (stdout[-2000:], stderr[-3000:])
    assert "Traceback" not in stderr, stderr
    latest = CheckpointManager(out / "checkpoints").latest()
    assert latest is not None and int(latest.name[5:]) >= 3
    assert f"stopped by signal {int(sig)}" in stdout + stderr


# ----------------------------------------------------------------------------- 3. exact resume

@pytest.mark.slow
@pytest.mark.parametrize("grad_cache", [False, pytest.param(True, marks=pytest.mark.long)], ids=["one_pass", "grad_cache"])
def test_resume_mid_epoch_is_exact_with_drop_path_and_workers(tmp_path, grad_cache):
    common = ["model.drop_path_rate=0.2", "data.num_workers=2", "train.epochs=2", "train.ckpt_every=5"]
    if grad_cache:
        common += ["train.global_batch=32", "train.micro_batch=16"]
    full = Trainer(tiny_config(tmp_path / "a", *common)).fit()
    Trainer(tiny_config(tmp_path / "b", *common, "train.max_steps=5")).fit()
    resumed = Trainer(tiny_config(tmp_path / "b", *common, "train.resume=auto")).fit()
    assert len(full.losses) == 16 and len(resumed.losses) == 11
    assert resumed.losses == full.losses[5:]  # every step, bit for bit


# ----------------------------------------------------------------------------- 4. durable checkpoints

def test_save_fsyncs_every_file_and_directory_before_publishing(tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def rename(src, dst):
        renamed.append((str(src), set(synced)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)

    def write(directory: Path):
        (directory / "shards").mkdir()
        (directory / "shards/a.bin").write_bytes(b"a" * 100)
        (directory / "b.bin").write_bytes(b"b" * 10)

    final = CheckpointManager(tmp_path / "ckpts").save(7, write, meta={})
    src, synced_before = renamed[0]
    tmp = Path(src)
    for path in (tmp / "shards/a.bin", tmp / "b.bin", tmp / META, tmp / "shards", tmp):
        assert str(path) in synced_before, (path, synced_before)
    assert str(tmp_path / "ckpts") in synced  # the parent, after the rename
    meta = json.loads((final / META).read_text())
    assert meta[FILES_KEY]["shards/a.bin"]["bytes"] == 100


@pytest.mark.slow
def test_resume_auto_falls_back_over_a_truncated_checkpoint(trained_run, tmp_path):
    run = _copy_run(trained_run[0], tmp_path / "run")
    newest = run / "checkpoints/step_00000004/state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    proc = _run(_cli(run, "train.max_steps=6", "train.ckpt_every=2", "train.keep_last=3", "--resume", "auto"),
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step_00000004" in proc.stderr and "state.pt" in proc.stderr and "falling back" in proc.stderr
    assert "resumed from" in proc.stdout + proc.stderr and "step_00000002" in proc.stdout + proc.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-4:] == [3, 4, 5, 6]  # continued from step 2


@pytest.mark.slow
def test_resume_auto_with_no_usable_checkpoint_names_the_files(trained_run, tmp_path):
    run = _copy_run(trained_run[0], tmp_path / "run")
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "state.pt").write_bytes(b"garbage")
    proc = _run(_cli(run, "train.max_steps=6", "--resume", "auto"), tmp_path)
    line = _one_line_error(proc, "no usable checkpoint", "step_00000002", "step_00000004")
    assert "state.pt" in line and "falling back" not in proc.stderr  # no fallback promised where there is none


def test_resume_auto_warns_about_a_skipped_checkpoint_only_when_it_falls_back_to_one(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpts")
    for step in (2, 4):
        manager.save(step, lambda directory: (directory / "state.bin").write_bytes(b"x" * 10), meta={})
    (tmp_path / "ckpts/step_00000004/state.bin").write_bytes(b"y")
    warnings = []
    assert manager.resolve("auto", warnings.append).name == "step_00000002"
    assert len(warnings) == 1 and "step_00000004" in warnings[0] and "falling back to step_00000002" in warnings[0]
    (tmp_path / "ckpts/step_00000002/state.bin").write_bytes(b"y")
    warnings.clear()
    with pytest.raises(CheckpointError, match="no usable checkpoint for --resume auto: step_00000004: .*; "
                                              "step_00000002: "):
        manager.resolve("auto", warnings.append)
    assert warnings == []  # the error line alone: no warning promising a previous checkpoint


def test_a_checkpoint_folder_renamed_or_linked_in_under_a_later_step_is_not_taken_for_that_step(tmp_path):
    # Before: auto took a link step_00000010 -> another run's step 2 as the newest checkpoint, on every
    # requeue, and redid the steps after 2; a link to another run's step 6 under its own name was taken as
    # this run's progress (steps 5-6 missing from the logs); a meta.json edited to another step skipped
    # the resume checks.
    def state(directory):
        (directory / "state.bin").write_bytes(b"x")

    manager = CheckpointManager(tmp_path / "run/checkpoints")
    for step in (2, 4):
        manager.save(step, state, meta={})
    other = CheckpointManager(tmp_path / "other/checkpoints").save(2, state, meta={})
    (tmp_path / "run/checkpoints/step_00000010").symlink_to(other, target_is_directory=True)
    warnings = []
    assert manager.resolve("auto", warnings.append).name == "step_00000004"
    assert len(warnings) == 1 and "step_00000010 is not usable: a link to " in warnings[0]
    (tmp_path / "run/checkpoints/step_00000010").unlink()
    moved = CheckpointManager(tmp_path / "other/checkpoints").save(6, state, meta={})  # under its own step's name
    (tmp_path / "run/checkpoints/step_00000006").symlink_to(moved, target_is_directory=True)
    warnings.clear()
    assert manager.resolve("auto", warnings.append).name == "step_00000004"
    assert len(warnings) == 1 and "step_00000006 is not usable: a link to " in warnings[0]
    assert manager.resolve(str(tmp_path / "run/checkpoints/step_00000006")).resolve() == moved  # by its path: yes
    (tmp_path / "run/checkpoints/step_00000006").unlink()
    os.rename(tmp_path / "run/checkpoints/step_00000004", tmp_path / "run/checkpoints/step_00000009")
    with pytest.raises(CheckpointError, match=r"'step' is 4 but its folder is named step_00000009; .*step_00000004"):
        read_meta(tmp_path / "run/checkpoints/step_00000009")
    assert manager.resolve("auto", warnings.append).name == "step_00000002"
    renamed_by_user = tmp_path / "best"  # any other name is the user's own: resumable by its path
    os.rename(tmp_path / "run/checkpoints/step_00000009", renamed_by_user)
    assert read_meta(renamed_by_user)["step"] == 4


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpts")
    manager.save(1, lambda d: (d / "state.pt").write_bytes(b"x"), meta={})

    def write(directory: Path):
        (directory / "state.pt").write_bytes(b"partial")
        raise OSError(28, "No space left on device", str(directory / "state.pt"))

    with pytest.raises(CheckpointError, match="disk is full") as err:
        manager.save(2, write, meta={})
    assert "step_00000001" in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "ckpts").glob("*.tmp"))
    assert [p.name for p in manager.complete()] == ["step_00000001"]
    assert manager.resolve("auto") == tmp_path / "ckpts/step_00000001"


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_disk_full_on_a_real_small_filesystem(tmp_path):
    """A tmpfs with room for one tiny checkpoint (~33 MB): the second save fills it."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "48m"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        out = disk / "run"
        proc = _run(_cli(out, "train.max_steps=4", "train.ckpt_every=2", "train.keep_last=3"), tmp_path)
        _one_line_error(proc, "disk is full", "step_00000004", "step_00000002")
        manager = CheckpointManager(out / "checkpoints")
        assert [p.name for p in manager.complete()] == ["step_00000002"]
        assert not list((out / "checkpoints").glob("*.tmp"))
        assert manager.verify(out / "checkpoints/step_00000002") is None
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ----------------------------------------------------------------------------- 5. resume checks the config

@pytest.mark.parametrize("changes,keys", [
    (["model.name=vit_tiny_patch7_28"], ["model.name"]),
    (["train.seed=1", "train.micro_batch=16", "mask.ratio=0.5"], ["train.seed", "train.micro_batch", "mask.ratio"]),
    (["data.num_samples=512"], ["data.num_samples"]),
    (["objective.head.layers=2"], ["objective.head.layers"]),
])
@pytest.mark.slow
def test_resume_refuses_changes_of_shapes_order_and_masks(trained_run, tmp_path, changes, keys):
    run = _copy_run(trained_run[0], tmp_path / "run")
    proc = _run(_cli(run, "train.max_steps=6", *changes, "--resume", "auto"), tmp_path)
    line = _one_line_error(proc, "cannot resume", "train.resume_allow_changes", *[f"{k}: " for k in keys])
    assert "->" in line
    assert not (run / "checkpoints/step_00000006").exists()


@pytest.mark.slow
def test_resume_warns_about_schedule_changes_and_accepts_the_escape_hatch(trained_run, tmp_path):
    run = _copy_run(trained_run[0], tmp_path / "run")
    proc = _run(_cli(run, "train.max_steps=5", "train.epochs=3", "optim.blr=2e-3", "--resume", "auto"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.epochs changed: 2 -> 3" in proc.stderr and "optim.blr changed" in proc.stderr
    proc = _run(_cli(run, "train.max_steps=6", "train.epochs=3", "data.num_samples=300",
                     "train.resume_allow_changes=[data.num_samples]", "--resume", "auto"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data.num_samples changed: 256 -> 300" in proc.stderr


@pytest.mark.slow
def test_a_fresh_run_never_rotates_away_another_runs_checkpoints(trained_run, tmp_path):
    run = _copy_run(trained_run[0], tmp_path / "run")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = _run(_cli(run, "train.max_steps=2", "train.ckpt_every=2"), tmp_path)  # no --resume
    _one_line_error(proc, "already holds checkpoints", "--resume auto", "train.output_dir")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_resume_allow_changes_names_only_known_keys(tmp_path):
    from scale.config import ConfigError

    with pytest.raises(ConfigError, match="train.resume_allow_changes: 'data.rot'"):
        tiny_config(tmp_path, "train.resume_allow_changes=[data.rot]")


# ----------------------------------------------------------------------------- 6. one error path

BAD_OVERRIDES = [
    ("optim.lr=-1", "optim.lr"), ("optim.min_lr=-1e-6", "optim.min_lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"), ("optim.betas=[0.9,1.0]", "optim.betas[1]"),
    ("optim.betas=[-0.1,0.9]", "optim.betas[0]"), ("data.num_workers=-1", "data.num_workers"),
    ("data.std=[0.0]", "data.std[0]"), ("data.crop_scale=[0.8,0.2]", "data.crop_scale"),
    ("data.crop_scale=[0.0,1.0]", "data.crop_scale"), ("data.crop_scale=[0.5,1.5]", "data.crop_scale"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate"), ("model.drop_path_rate=-0.1", "model.drop_path_rate"),
    ("optim.blr=.inf", "optim.blr"), ("train.seed=-3", "train.seed"), ("eval.knn_k=0", "eval.knn_k"),
    ("optim.clip_grad=0", "optim.clip_grad"), ("objective.max_temperature=.inf", "temperature"),
    ("data.crop_scale=[1,2,3]", "data.crop_scale"), ("train.resume_allow_changes=[nope]", "resume_allow_changes"),
]


@pytest.mark.parametrize("override,key", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_out_of_range_values_are_one_line_naming_the_key(override, key, capsys):
    from scale.train import main

    assert main([*TINY_OVERRIDES, override, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and key in err and err.startswith("scale-train: error: "), err


@pytest.mark.parametrize("key,value", [("model.name", "vit_nope"), ("engine.name", "nope"), ("data.name", "nope"),
                                       ("mask.name", "nope"), ("objective.name", "nope")])
def test_unknown_registry_names_are_named_as_the_key(tmp_path, key, value, capsys):
    from scale.train import main

    assert main([*TINY_OVERRIDES, f"train.output_dir={tmp_path}", "train.max_steps=1", f"{key}={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{key}: unknown" in err and "registered:" in err, err


@pytest.mark.parametrize("content,needle", [
    (b"model: [unclosed\n", "not valid YAML"),
    (b"model:\n  name: \xff\xfe\n", "not UTF-8"),
    (b"model: !!python/object/apply:os.system ['touch pwned']\n", "not valid YAML"),
    (b"model: !custom {name: x}\n", "not valid YAML"),
    (b"a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\ndata:\n  crop_scale: *e\n", "YAML nodes"),
    (b"# " + b"x" * (1 << 20) + b"\n", "bytes"),
    (b"- just\n- a list\n", "expected a mapping"),
])
def test_bad_recipes_are_one_line(tmp_path, content, needle, capsys):
    from scale.train import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    assert main(["--config", str(recipe), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err and len(err) < 400, err
    assert not (tmp_path / "pwned").exists()


def test_missing_recipe_and_bad_override_yaml(tmp_path, capsys):
    from scale.train import main

    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["optim.betas=[0.9, 0.95"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.betas" in err and "\n" not in err


@pytest.mark.slow
def test_traceback_only_with_scale_debug(tmp_path):
    cmd = [sys.executable, "-m", "scale.train", "optim.lr=-1", "--print-config"]
    plain = _run(cmd, tmp_path)
    _one_line_error(plain, "optim.lr")
    debug = subprocess.run(cmd, env=python_env({"SCALE_DEBUG": "1"}), cwd=tmp_path, capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


@pytest.mark.slow
@pytest.mark.long
def test_checkpoint_errors_of_export_and_eval(trained_run, tmp_path):
    ckpt = trained_run[0] / "checkpoints/step_00000004"
    # an export target that is a directory
    target = tmp_path / "existing_dir"
    target.mkdir()
    _one_line_error(_run([sys.executable, "-m", "scale.export", "--checkpoint", str(ckpt), "--out", str(target)],
                         tmp_path), "--out", "is a directory")
    # not a checkpoint at all
    _one_line_error(_run([sys.executable, "-m", "scale.export", "--checkpoint", str(tmp_path), "--out",
                          str(tmp_path / "a.safetensors")], tmp_path), str(tmp_path))
    # a truncated checkpoint file
    broken = _copy_run(ckpt, tmp_path / "step_00000004")
    (broken / "state.pt").write_bytes((broken / "state.pt").read_bytes()[:1000])
    _one_line_error(_run([sys.executable, "-m", "scale.export", "--checkpoint", str(broken), "--out",
                          str(tmp_path / "b.safetensors")], tmp_path), "state.pt", "truncated")
    _one_line_error(_run([sys.executable, "-m", "scale.eval", "knn", "--checkpoint", str(broken), "--no-progress"],
                         tmp_path), "state.pt")
    # an eval override that the checkpoint's architecture would silently beat
    _one_line_error(_run([sys.executable, "-m", "scale.eval", "knn", "--checkpoint", str(ckpt), "--no-progress",
                          "model.name=vit_small_patch16"], tmp_path), "model.name", "would be ignored")


@pytest.mark.slow
def test_a_corrupt_meta_json_is_one_line_for_eval_and_resume(tmp_path):
    ckpt = tmp_path / "run/checkpoints/step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("[1, 2")
    _one_line_error(_run([sys.executable, "-m", "scale.eval", "knn", "--checkpoint", str(ckpt), "--no-progress"],
                         tmp_path), "meta.json", "is not JSON")
    _one_line_error(_run(_cli(tmp_path / "run", "train.max_steps=1", "--resume", str(ckpt)), tmp_path),
                    "meta.json", "is not JSON")


@pytest.mark.slow
def test_an_unwritable_output_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    _one_line_error(_run(_cli(blocker / "run", "train.max_steps=1"), tmp_path), "train.output_dir", "cannot be written")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("override,needle", [
    ("model.img_size=30", "patch_size"), ("train.activation_checkpointing=0,99", "train.activation_checkpointing"),
    ("mask.ratio=0.99", "mask.ratio"), ("model.attn_backend=xformers", "xformers"),
])
def test_values_checked_where_the_model_is_built_are_one_line_too(tmp_path, override, needle, capsys):
    from scale.train import main

    assert main([*TINY_OVERRIDES, f"train.output_dir={tmp_path}", "train.max_steps=1", override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err, err


@pytest.mark.slow
def test_resume_allow_changes_accepts_a_section_and_old_key_names_are_compared(trained_run, tmp_path):
    run = _copy_run(trained_run[0], tmp_path / "run")
    proc = _run(_cli(run, "train.max_steps=5", "mask.ratio=0.5", "train.resume_allow_changes=[mask]",
                     "--resume", "auto"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from scale.trainer.resume_check import config_changes

    old = {"train": {"contrastive_batch": 4096}}  # a config saved before the rename
    assert config_changes(old, {"train": {"global_batch": 1024}}) == [("train.global_batch", 4096, 1024)]


def test_resume_refuses_another_engine_family(tmp_path):
    from scale.config import to_dict
    from scale.trainer.resume_check import check_resume_config

    cfg = tiny_config(tmp_path)
    meta = {"engine": "fsdp", "checkpoint_format": "dcp", "world_size": 1}
    with pytest.raises(CheckpointError, match=r"engine: 'fsdp \(dcp checkpoint\)' -> .*torch checkpoint"):
        check_resume_config(to_dict(cfg), cfg, meta, "torch", 1, "ckpt")
    assert check_resume_config(to_dict(cfg), cfg, dict(meta, checkpoint_format="torch"), "torch", 1, "ckpt") == []


@pytest.mark.parametrize("module", ["scale.train", "scale.eval.__main__", "scale.export", "scale.demo", "scale.plot",
                                    "scale.mask_pictures", "scale.shards.verify", "scale.shards.fashion_mnist",
                                    "scale.shards.imagefolder"])
def test_a_usage_mistake_is_one_line_and_exit_2_on_every_command(module, capsys):
    # argparse printed its usage block before the error line: two or more lines for one mistake.
    import importlib

    with pytest.raises(SystemExit) as exited:
        importlib.import_module(module).main(["--no-such-flag"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and "usage:" not in err, err
