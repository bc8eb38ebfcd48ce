"""scale/checkpoint_io: each format's writer and reader round-trip, and each format's file
names and keys are defined in its format module only.

DeepSpeed's writer and reader need DeepSpeed's engine and a process group; they are
exercised by tests/test_deepspeed_reliability.py (resume, export, crafted files).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from scale.checkpoint_io import (CheckpointFileError, CheckpointFormatError, dcp, deepspeed, detect_format,
                                 encoder_state_dict, load_checkpoint, safe_load, torch_file)

SCALE = Path(__file__).resolve().parents[1] / "scale"
FORMAT_PACKAGE = SCALE / "checkpoint_io"
# dcp.save / dcp.load without a process group say they assume a single process: the intent here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
EXTRA = {"step": 7, "config": {"model": {"name": "vit_tiny"}}}


class Toy(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)


def trained(seed: int):
    """A module and an AdamW that has stepped once (so the optimizer has state)."""
    module = Toy(seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module.head(module.encoder(torch.randn(5, 4))).square().sum().backward()
    optimizer.step()
    return module, optimizer


def assert_same(a: nn.Module, b: nn.Module, opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    for pa, pb in zip(a.parameters(), b.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(opt_a.state[pa][key]), torch.as_tensor(opt_b.state[pb][key])), key


def test_torch_file_round_trip(tmp_path):
    module, optimizer = trained(0)
    torch_file.save(tmp_path, module, optimizer, EXTRA)
    assert sorted(p.name for p in tmp_path.iterdir()) == [torch_file.STATE_FILE]

    fresh = Toy(1)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert torch_file.load(tmp_path, fresh, fresh_optimizer, map_location="cpu") == EXTRA
    assert_same(module, fresh, optimizer, fresh_optimizer)

    assert detect_format(tmp_path) == torch_file.FORMAT
    loaded = load_checkpoint(tmp_path)
    assert loaded.format == "torch" and loaded.config == EXTRA["config"]
    assert set(encoder_state_dict(loaded.model_state)) == {"weight", "bias"}


def test_dcp_round_trip_without_a_process_group(tmp_path):
    module, optimizer = trained(0)
    model_state, optimizer_state = get_state_dict(module, optimizer)
    dcp.save(tmp_path, model_state, optimizer_state, EXTRA, write_extra=True)
    assert {p.name for p in tmp_path.iterdir()} == {dcp.DCP_DIR, dcp.EXTRA_FILE}

    fresh = Toy(1)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh.head(fresh.encoder(torch.randn(5, 4))).sum().backward()
    fresh_optimizer.step()  # state to be overwritten
    model_state, optimizer_state = get_state_dict(fresh, fresh_optimizer)
    model_state, optimizer_state, extra = dcp.load(tmp_path, model_state, optimizer_state)
    set_state_dict(fresh, fresh_optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    assert extra == EXTRA
    assert_same(module, fresh, optimizer, fresh_optimizer)

    assert detect_format(tmp_path) == dcp.FORMAT
    loaded = load_checkpoint(tmp_path)  # the model.* tensors alone, read in this process
    assert loaded.format == "dcp" and loaded.config == EXTRA["config"]
    assert loaded.model_state.keys() == module.state_dict().keys()
    for name, value in module.state_dict().items():
        assert torch.equal(loaded.model_state[name], value), name


def test_dcp_extra_written_by_one_rank_only(tmp_path):
    module, optimizer = trained(0)
    dcp.save(tmp_path, *get_state_dict(module, optimizer), EXTRA, write_extra=False)
    assert not (tmp_path / dcp.EXTRA_FILE).exists()
    assert load_checkpoint(tmp_path).config is None  # no trainer state, no run config beside it


def test_unreadable_and_unknown_checkpoints_are_one_line_errors(tmp_path):
    module, optimizer = trained(0)
    torch_file.save(tmp_path, module, optimizer, EXTRA)
    state_file = tmp_path / torch_file.STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:1000])
    with pytest.raises(CheckpointFileError, match=f"{torch_file.STATE_FILE}.*truncated or not a torch file"):
        torch_file.load(tmp_path, module, optimizer, "cpu")
    other = tmp_path / "other"
    other.mkdir()
    (other / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointFormatError) as err:
        detect_format(other)
    message = str(err.value)
    assert "\n" not in message and "weights.bin" in message
    for fmt in (torch_file, dcp, deepspeed):
        assert fmt.LAYOUT in message


# ----------------------------------------------------------------------------- one place per format

def string_constants(path: Path):
    """The string literals of a module, docstrings and __all__ (module names) left out."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            skipped.update(id(n) for n in ast.walk(node.value))
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skipped.add(id(first.value))
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped}


@pytest.mark.slow
@pytest.mark.parametrize("module, names", [
    (torch_file, ["STATE_FILE"]),
    (dcp, ["DCP_DIR", "EXTRA_FILE"]),
    (deepspeed, ["EXTRA_KEY", "MODULE_STATES_FILE", "ZERO3_MODULE_STATES"]),
    (safe_load, ["FORCE_WEIGHTS_ONLY"]),
])
def test_file_names_and_keys_are_defined_in_their_format_module_only(module, names):
    home = Path(module.__file__)
    for name in names:
        literal = getattr(module, name)
        elsewhere = [str(p.relative_to(SCALE)) for p in sorted(SCALE.rglob("*.py"))
                     if p != home and literal in string_constants(p)]
        assert not elsewhere, f"{name} = {literal!r} of {home.name} is spelled out again in {elsewhere}"


def test_the_deepspeed_tag_is_passed_by_the_format_module_only():
    """The tag's value ("deepspeed") is also the engine's name, so look for its use instead: a tag= argument."""
    users = [str(p.relative_to(SCALE)) for p in sorted(SCALE.rglob("*.py"))
             if any(isinstance(node, ast.keyword) and node.arg == "tag" for node in ast.walk(ast.parse(p.read_text())))]
    assert users == ["checkpoint_io/deepspeed.py"]


def test_checkpoint_files_are_written_and_read_by_the_format_modules_only():
    """No torch.save / torch.load / torch.distributed.checkpoint outside scale/checkpoint_io."""
    offenders = []
    for path in sorted(SCALE.rglob("*.py")):
        if FORMAT_PACKAGE in path.parents:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in ("save", "load")
                    and isinstance(node.value, ast.Name) and node.value.id == "torch"):
                offenders.append(f"{path.relative_to(SCALE)}:{node.lineno} torch.{node.attr}")
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "torch.distributed.checkpoint" for n in names):
                offenders.append(f"{path.relative_to(SCALE)}:{node.lineno} imports torch.distributed.checkpoint")
    assert not offenders


# ----------------------------------------------------------------------------- the arrow points down

BELOW_THE_TRAINER = ("checkpoint_io", "engine", "data", "masking", "objectives", "models", "shards")


def imported_modules(path: Path):
    """(line, absolute module name) of every import in a module of scale/, relative ones resolved."""
    package = ".".join(("scale", *path.relative_to(SCALE).parent.parts))
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            yield node.lineno, ".".join([*base, node.module] if node.module else base)


def imports_from(paths, package: str):
    """'file:line imports module' for each import of `package`, or of a module in it, by `paths`."""
    return [f"{path.relative_to(SCALE)}:{line} imports {name}" for path in paths
            for line, name in imported_modules(path) if name == package or name.startswith(package + ".")]


def test_nothing_below_the_trainer_imports_the_trainer():
    """The checkpoint directory (manager, meta.json, seal/verify) lives in scale/checkpoint_io, where the
    trainer, export and eval all read it: no package the trainer builds on imports scale.trainer back."""
    below = [path for package in BELOW_THE_TRAINER for path in sorted((SCALE / package).rglob("*.py"))]
    assert not imports_from(below, "scale.trainer")


def test_checkpoint_checksums_are_not_borrowed_from_the_shards():
    """The file hash checkpoints record lives with the atomic writes (scale/atomic_files.py), not in the
    shard manifest: checkpoint_io reads nothing from scale.shards."""
    assert not imports_from(sorted(FORMAT_PACKAGE.rglob("*.py")), "scale.shards")
