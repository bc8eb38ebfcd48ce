"""Issue 25, checkpoints: a checkpoint reads only its own files, reading DCP metadata cannot change
the process, meta.json is validated as a schema by every reader, a fallback repairs what it fell
back over, rotation leaves nothing behind, and FSDP checkpoint failures are one line.

Crafted-file tests record every file the process opens (an audit hook) and check that nothing
outside the checkpoint was, and that the refusal reads the same whatever the outside file holds.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import pytest
import torch
import torch.distributed.checkpoint as dist_cp

from conftest import REPO, python_env, tiny_config
from scale.checkpoint_io import load_checkpoint
from scale.checkpoint_io.directory import FILES_KEY, META, CheckpointError, CheckpointManager
from scale.errors import UserError
from scale.trainer import Trainer
from test_reliability import _CreatesFile, _cli, _copy_run, _one_line_error, _reseal, _run, trained_run  # noqa: F401

# dcp.save / dcp.load without a process group say they assume a single process: the intent here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

_RECORDING: List[List[str]] = []


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _RECORDING and isinstance(args[0], (str, bytes, Path)):
        _RECORDING[-1].append(str(Path(args[0] if not isinstance(args[0], bytes) else args[0].decode()).absolute()))


sys.addaudithook(_record_opens)  # builtins.open, io.open and os.open all raise "open"


@contextlib.contextmanager
def opened_files() -> Iterator[List[str]]:
    """Every path this process opens inside the block (audit hooks cannot be removed: it only records)."""
    opened: List[str] = []
    _RECORDING.append(opened)
    try:
        yield opened
    finally:
        _RECORDING.pop()


def _dcp_checkpoint(path: Path) -> Path:
    """An FSDP-format checkpoint directory (dcp/ + extra.pt) of one tensor, written without a process group."""
    dist_cp.save({"model": {"encoder.w": torch.randn(30, 40)}}, checkpoint_id=str(path / "dcp"), no_dist=True)
    torch.save({"step": 1}, path / "extra.pt")
    return path


def _rewrite_storage_paths(dcp_dir: Path, relative_path: str) -> None:
    """What an attacker writes: the real .metadata with every storage entry pointing at `relative_path`."""
    metadata = pickle.loads((dcp_dir / ".metadata").read_bytes())  # our own file: plain pickle is fine here
    for info in metadata.storage_data.values():
        info.relative_path = relative_path
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(metadata))


# ----------------------------------------------------------------------------- 1. only its own files

@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_meta_json_naming_a_file_outside_is_refused_without_touching_it(trained_run, tmp_path, how):
    run = _copy_run(trained_run[0], tmp_path / "run")
    ckpt = run / "checkpoints/step_00000004"
    secret = tmp_path / "secret.txt"
    name = {"dotdot": "../../../secret.txt", "absolute": str(secret), "symlink": "inside.txt"}[how]
    if how == "symlink":
        (ckpt / "inside.txt").symlink_to(secret)
    manager = CheckpointManager(run / "checkpoints")
    answers = []
    for content in (b"top secret", b"something else entirely"):  # the record matches the first only
        secret.write_bytes(content)
        meta = json.loads((ckpt / META).read_text())
        meta[FILES_KEY][name] = {"bytes": 10, "sha256": "0" * 64}
        if content == b"top secret":
            from scale.atomic_files import sha256_of_file

            meta[FILES_KEY][name]["sha256"] = sha256_of_file(secret)
        (ckpt / META).write_text(json.dumps(meta))
        with opened_files() as opened:
            problem = manager.verify(ckpt)
        assert str(secret) not in opened, opened
        assert problem is not None and "refused" in problem and name[:60] in problem and str(ckpt) in problem
        answers.append(problem)
    assert answers[0] == answers[1]  # no oracle: the same answer whatever the outside file holds
    with pytest.raises(CheckpointError, match="refused"):
        manager.resolve(str(ckpt))
    warnings: List[str] = []
    assert manager.newest_usable(warnings.append).name == "step_00000002"  # --resume auto falls back over it
    assert "refused" in warnings[0]


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "etc_passwd"])
def test_dcp_storage_entries_outside_the_checkpoint_are_refused_before_any_read(tmp_path, how):
    ckpt = _dcp_checkpoint(tmp_path / "step_00000001")
    outside = tmp_path / "outside.distcp"
    shutil.move(ckpt / "dcp/__0_0.distcp", outside)  # real weights, now outside the checkpoint
    if how == "symlink":
        (ckpt / "dcp/__0_0.distcp").symlink_to(outside)
    else:
        _rewrite_storage_paths(ckpt / "dcp", {"dotdot": "../../outside.distcp", "absolute": str(outside),
                                              "etc_passwd": "/etc/passwd"}[how])
    with opened_files() as opened, pytest.raises(UserError) as refused:
        load_checkpoint(ckpt)
    assert str(outside) not in opened and "/etc/passwd" not in opened, opened
    message = str(refused.value)
    assert "\n" not in message and str(ckpt) in message and "refused" in message
    assert ("__0_0.distcp" if how == "symlink" else {"etc_passwd": "/etc/passwd"}.get(how, "outside.distcp")) \
        in message


# ----------------------------------------------------------------------------- 2. metadata cannot change the process

# GLOBAL pathlib.PosixPath; BUILD (None, {'__truediv__': None}) onto it: pickle sets the attribute on the class.
_BUILD_ONTO_A_CLASS = b"\x80\x04cpathlib\nPosixPath\n(N}X\x0b\x00\x00\x00__truediv__Nstb."


class _Reduces:
    """Pickles as REDUCE(func, args): an allowed constructor called with odd arguments."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_dcp_metadata_cannot_set_attributes_on_a_class(tmp_path):
    ckpt = _dcp_checkpoint(tmp_path / "step_00000001")
    (ckpt / "dcp/.metadata").write_bytes(_BUILD_ONTO_A_CLASS)
    before = dict(pathlib.PosixPath.__dict__)
    try:
        with pytest.raises(UserError, match=r"\.metadata.*refused or damaged"):
            load_checkpoint(ckpt)
        assert dict(pathlib.PosixPath.__dict__) == before  # nothing set on the class (__truediv__, storage_meta)
        assert (tmp_path / "x").name == "x"  # path joins still work
    finally:  # keep the rest of the session working even when the check above fails
        for name in set(pathlib.PosixPath.__dict__) - set(before):
            delattr(pathlib.PosixPath, name)


@pytest.mark.parametrize("stream", [
    pickle.dumps(_Reduces(torch.Size, (("a", "b"),))),
    pickle.dumps(_Reduces(torch.serialization._get_layout, (5,))),
    pickle.dumps(_Reduces(pathlib.PosixPath, (1, 2))),
    pickle.dumps(_Reduces(dict, ())),  # a global outside the allow-list
    pickle.dumps(torch.Size([2, 3])),  # allowed pieces, but not a Metadata record
    _BUILD_ONTO_A_CLASS,
], ids=["size_of_strings", "layout_of_int", "path_of_ints", "dict_global", "not_metadata", "build_onto_class"])
def test_dcp_metadata_reader_refuses_what_is_not_plain_dcp_metadata(stream):
    from scale.checkpoint_io.dcp_metadata import MetadataRefused, read_dcp_metadata

    with pytest.raises(MetadataRefused):
        read_dcp_metadata(stream)


def test_dcp_metadata_reader_rebuilds_real_metadata_exactly(tmp_path):
    """The reader replaces pickle.load for DCP's own files: a model and AdamW state, bytes items included."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from scale.checkpoint_io.dcp_metadata import read_dcp_metadata

    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    model_state, optimizer_state = get_state_dict(module, optimizer)
    dist_cp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp_path), no_dist=True)
    data = (tmp_path / ".metadata").read_bytes()
    assert read_dcp_metadata(data) == pickle.loads(data)


# ----------------------------------------------------------------------------- 3. meta.json is a schema

def _edit_meta(ckpt: Path, edit) -> None:
    meta = json.loads((ckpt / META).read_text())
    (ckpt / META).write_text(json.dumps(edit(meta)))


BAD_META = {
    "json_array": lambda meta: [1, 2],
    "files_record_a_string": lambda meta: {**meta, FILES_KEY: {**meta[FILES_KEY], "state.pt": "abc"}},
    "config_a_list": lambda meta: {**meta, "config": [1, 2]},
    "step_a_string": lambda meta: {**meta, "step": "4"},
}


@pytest.mark.parametrize("bad", sorted(BAD_META))
def test_meta_json_that_does_not_fit_the_schema_is_one_line_for_every_reader(trained_run, tmp_path, bad, capsys):
    from scale.eval.__main__ import main as eval_main
    from scale.export import main as export_main

    run = _copy_run(trained_run[0], tmp_path / "run")
    ckpt = run / "checkpoints/step_00000004"
    _edit_meta(ckpt, BAD_META[bad])
    problem = CheckpointManager(run / "checkpoints").verify(ckpt)
    assert problem is not None and str(ckpt / META) in problem
    for main, argv in ((export_main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "x.safetensors")]),
                       (eval_main, ["knn", "--checkpoint", str(ckpt), "--no-progress"])):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "meta.json" in err, err
    with pytest.raises(CheckpointError, match="meta.json"):
        Trainer(tiny_config(tmp_path, "train.max_steps=6", "train.ckpt_every=2", "train.keep_last=3",
                            f"train.resume={ckpt}")).fit()


@pytest.mark.parametrize("key", ["config", "world_size", "checkpoint_format"])
def test_resume_refuses_a_checkpoint_whose_meta_cannot_be_checked(trained_run, tmp_path, key):
    run = _copy_run(trained_run[0], tmp_path / "run")
    ckpt = run / "checkpoints/step_00000004"
    _edit_meta(ckpt, lambda meta: {k: v for k, v in meta.items() if k != key})
    with pytest.raises(CheckpointError, match=f"cannot resume .*does not record '{key}'"):
        Trainer(tiny_config(tmp_path, "train.max_steps=6", "train.ckpt_every=2", "train.keep_last=3",
                            f"train.resume={ckpt}")).fit()


# ----------------------------------------------------------------------------- 4. a fallback repairs, rotation cleans

def test_a_checkpoint_fallen_back_over_is_rewritten_when_its_step_comes_again(trained_run, tmp_path, capsys):
    from scale.export import main as export_main

    run = _copy_run(trained_run[0], tmp_path / "run")
    damaged = run / "checkpoints/step_00000004"
    (damaged / "state.pt").write_bytes((damaged / "state.pt").read_bytes()[:1000])
    steps = ("train.max_steps=4", "train.ckpt_every=2", "train.keep_last=3", "train.resume=auto")
    summary = Trainer(tiny_config(tmp_path, *steps)).fit()
    assert "falling back" in capsys.readouterr().err and summary.steps_done == 2  # from step 2, redone
    manager = CheckpointManager(run / "checkpoints")
    assert summary.last_checkpoint == str(damaged) and manager.verify(damaged) is None
    warnings: List[str] = []
    assert manager.newest_usable(warnings.append) == damaged and warnings == []  # later resumes: no fallback
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "x.safetensors")]) == 0


def test_a_kill_during_rotation_leaves_nothing_that_stays(tmp_path, monkeypatch):
    import scale.checkpoint_io.directory as checkpoint

    manager = CheckpointManager(tmp_path / "ckpts", keep_last=1)

    def write(directory: Path) -> None:
        (directory / "state.pt").write_bytes(b"x" * 100)

    manager.save(1, write, meta={})
    real_rmtree = shutil.rmtree

    def killed_mid_rmtree(path, ignore_errors=False):
        """rmtree's first unlink (meta.json), then SIGKILL."""
        if Path(path).is_dir():
            (Path(path) / META).unlink(missing_ok=True)
            raise SystemExit("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_mid_rmtree)
    with pytest.raises(SystemExit):
        manager.save(2, write, meta={})  # published, then killed while rotating step 1 away
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    manager.save(3, write, meta={})
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["step_00000003"]


# ----------------------------------------------------------------------------- 7. FSDP failures are one line

def test_a_truncated_dcp_data_file_is_one_line_naming_it(tmp_path, capsys):
    from scale.export import main as export_main

    ckpt = _dcp_checkpoint(tmp_path / "step_00000001")
    data = ckpt / "dcp/__0_0.distcp"
    data.write_bytes(data.read_bytes()[:2000])
    with pytest.raises(UserError, match=r"__0_0\.distcp.*truncated"):
        load_checkpoint(ckpt)
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "__0_0.distcp" in err, err


def _fsdp_env() -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return python_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def _fsdp_resume(run: Path, cwd: Path) -> subprocess.CompletedProcess:
    cmd = _cli(run, "engine.name=fsdp", "train.max_steps=3", "train.ckpt_every=2", "--resume", "auto")
    return subprocess.run(cmd, env=_fsdp_env(), cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """A 2-step FSDP run (one process, gloo) with its checkpoint at step 2."""
    root = tmp_path_factory.mktemp("fsdp")
    done = subprocess.run(_cli(root / "run", "engine.name=fsdp", "train.max_steps=2", "train.ckpt_every=2"),
                          env=_fsdp_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


@pytest.mark.slow
def test_fsdp_resume_over_a_damaged_metadata_is_one_line(fsdp_run, tmp_path):
    run = _copy_run(fsdp_run, tmp_path / "run")
    ckpt = run / "checkpoints/step_00000002"
    (ckpt / "dcp/.metadata").write_bytes(b"\x80\x04garbage")
    _reseal(ckpt)
    proc = _fsdp_resume(run, tmp_path)
    _one_line_error(proc, ".metadata", "refused or damaged")


@pytest.mark.slow
def test_fsdp_resume_over_a_crafted_data_item_never_advises_weights_only_false(fsdp_run, tmp_path):
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    run = _copy_run(fsdp_run, tmp_path / "run")
    dcp_dir = run / "checkpoints/step_00000002/dcp"
    state: dict = {}
    _load_state_dict(state, storage_reader=dist_cp.FileSystemReader(str(dcp_dir)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)  # our own file: trusted here
    marker = tmp_path / "pwned"
    state["optimizer"]["param_groups"][0]["lr"] = _CreatesFile(marker)  # a bytes item, torch.load-ed on resume
    shutil.rmtree(dcp_dir)
    dist_cp.save(state, checkpoint_id=str(dcp_dir), no_dist=True)
    _reseal(dcp_dir.parent)
    proc = _fsdp_resume(run, tmp_path)
    _one_line_error(proc, "refused", ".distcp")
    assert "weights_only" not in proc.stderr + proc.stdout
    assert not marker.exists()


@pytest.mark.parametrize("fixed_name", ["state.pt", "meta.json"])
def test_a_fixed_file_name_that_is_a_symlink_leading_out_is_refused_without_reading_it(trained_run, tmp_path, capsys,
                                                                                      fixed_name):
    """The readers open state.pt and meta.json by name, not from a list the checkpoint gives: a link out is
    refused too (with state.pt left out of meta.json's `files`, nothing else would notice)."""
    run = _copy_run(trained_run[0], tmp_path / "run")
    ckpt = run / "checkpoints/step_00000004"
    meta = json.loads((ckpt / META).read_text())
    assert fixed_name == META or fixed_name in meta[FILES_KEY]
    if fixed_name != META:
        del meta[FILES_KEY][fixed_name]
        (ckpt / META).write_text(json.dumps(meta))
    outside = tmp_path / f"outside_{fixed_name}"
    shutil.move(str(ckpt / fixed_name), outside)
    (ckpt / fixed_name).symlink_to(outside)
    with opened_files() as opened:
        problem = CheckpointManager(run / "checkpoints").verify(ckpt)
        with pytest.raises(UserError, match="symlink leading out"):
            load_checkpoint(ckpt)
    assert str(outside) not in opened, opened
    assert problem is not None and "symlink leading out" in problem and fixed_name in problem
    from scale.export import main as export_main

    capsys.readouterr()
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "enc.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "symlink leading out" in err, err
