"""Export: any engine's checkpoint -> a timm VisionTransformer state dict in safetensors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from scale.checkpoint_io import CheckpointManager
from scale.config import to_dict
from scale.engine import plan_batch
from scale.engine.single import SingleProcessEngine
from scale.export import (CheckpointFormatError, load_checkpoint, main, timm_kwargs, timm_model_from_export)
from scale.pretraining import build_pretrain_module
from conftest import tiny_config

STEP = 7


def _module(tmp_path: Path, model: str = "vit_tiny_patch7_28"):
    cfg = tiny_config(tmp_path, f"model.name={model}")
    torch.manual_seed(0)
    module = build_pretrain_module(cfg, attn_backend="math")
    with torch.no_grad():  # away from the init, so a wrong or missing tensor shows in the outputs
        for p in module.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return cfg, module


def _save(cfg, write) -> Path:
    manager = CheckpointManager(Path(cfg.train.output_dir) / "checkpoints", keep_last=3)
    return manager.save(STEP, write, meta={"step": STEP, "engine": "test", "model": cfg.model.name})


def _assert_timm_matches(export: Path, module) -> None:
    """strict=True load into timm.create_model(<timm name>, num_classes=0, ...); same features on full images."""
    state = load_file(str(export))
    assert set(state) == set(k[len("encoder."):] for k in module.state_dict() if k.startswith("encoder."))
    with safe_open(str(export), framework="pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    spec = module.encoder.spec
    assert kwargs == timm_kwargs(spec)
    model = timm.create_model(kwargs["model_name"], num_classes=0, img_size=spec.img_size, patch_size=spec.patch_size,
                              in_chans=spec.in_chans, embed_dim=spec.embed_dim, depth=spec.depth,
                              num_heads=spec.num_heads)
    model.load_state_dict(state, strict=True)
    model.eval()
    module.eval()
    images = torch.randn(3, spec.in_chans, spec.img_size, spec.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), module.encoder.forward_features(images))
        torch.testing.assert_close(model(images), module.encoder(images)[:, 0])  # pooled = our CLS
    rebuilt = timm_model_from_export(export).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), module.encoder(images)[:, 0])


@pytest.mark.parametrize("model", ["vit_tiny_patch7_28", "vit_tiny_patch4_28"])
def test_single_engine_checkpoint_exports_to_timm(tmp_path, model, capsys):
    cfg, module = _module(tmp_path, model)
    engine = SingleProcessEngine(torch.device("cpu"))
    engine.setup(module, lambda m: torch.optim.AdamW(m.parameters()),
                 plan_batch(cfg.train, 1, module.objective.couples_batch))
    _save(cfg, lambda d: engine.save(d, {"step": STEP, "config": to_dict(cfg)}))
    out = tmp_path / "vit.safetensors"
    # A run directory resolves to its newest checkpoint.
    assert main(["--checkpoint", cfg.train.output_dir, "--out", str(out)]) == 0
    assert "timm.create_model('vit_tiny_patch16_224'" in capsys.readouterr().out
    _assert_timm_matches(out, module)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["source_format"] == "torch" and meta["step"] == str(STEP) and meta["scale_model"] == model


def test_ddp_style_prefixes_are_stripped(tmp_path):
    """A state dict saved from a wrapper (module., _orig_mod.) still exports timm's names only."""
    cfg, module = _module(tmp_path)
    state = {f"module._orig_mod.{k}": v for k, v in module.state_dict().items()}
    _save(cfg, lambda d: torch.save({"model": state, "optimizer": {}, "extra": {"config": to_dict(cfg)}},
                                    d / "state.pt"))
    out = tmp_path / "vit.safetensors"
    assert main(["--checkpoint", cfg.train.output_dir, "--out", str(out)]) == 0
    _assert_timm_matches(out, module)


def test_fsdp_dcp_checkpoint_exports_without_a_process_group(tmp_path):
    """FSDPEngine's layout: <ckpt>/dcp/ (torch.distributed.checkpoint, model + optimizer) and extra.pt."""
    import torch.distributed.checkpoint as dcp

    cfg, module = _module(tmp_path)
    optimizer = torch.optim.AdamW(module.parameters())
    sum(p.sum() for p in module.parameters() if p.requires_grad).backward()
    optimizer.step()  # a real optimizer state beside the model in the same DCP directory

    def write(directory: Path) -> None:
        with pytest.warns(UserWarning, match="single process"):
            dcp.save({"model": module.state_dict(), "optimizer": optimizer.state_dict()},
                     checkpoint_id=str(directory / "dcp"), no_dist=True)
        torch.save({"step": STEP, "config": to_dict(cfg)}, directory / "extra.pt")

    ckpt = _save(cfg, write)
    loaded = load_checkpoint(ckpt)
    assert loaded.format == "dcp" and loaded.config["model"]["name"] == cfg.model.name
    assert set(loaded.model_state) == set(module.state_dict())  # no optimizer entries
    out = tmp_path / "vit.safetensors"
    assert main(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
    _assert_timm_matches(out, module)


def test_deepspeed_module_states_export(tmp_path):
    """DeepSpeedEngine's layout (ZeRO 0-2 without partition files): <ckpt>/deepspeed/mp_rank_00_model_states.pt
    with the module state (bf16 under bf16 training) and the trainer state as client state."""
    cfg, module = _module(tmp_path)
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in module.state_dict().items()}

    def write(directory: Path) -> None:
        (directory / "deepspeed").mkdir()
        torch.save({"module": bf16, "buffer_names": [], "scale_extra": {"step": STEP, "config": to_dict(cfg)}},
                   directory / "deepspeed" / "mp_rank_00_model_states.pt")

    ckpt = _save(cfg, write)
    out = tmp_path / "vit.safetensors"
    assert main(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
    state = load_file(str(out))
    assert all(v.dtype == torch.float32 for v in state.values())
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["source_format"] == "deepspeed"
    expected = {k[len("encoder."):]: v.float() for k, v in bf16.items() if k.startswith("encoder.")}
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in state)


def test_unknown_layout_names_the_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    (ckpt / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="step_00000001.*unknown format.*weights.bin"):
        load_checkpoint(ckpt)
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "step_00000001" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors")]) == 2


@pytest.mark.slow
def test_real_fsdp_run_exports_and_its_knn_monitor_agrees_with_the_cli(tmp_path):
    """One FSDP2 process (gloo): the monitor gathers the sharded encoder; the export reads the DCP files."""
    import socket
    import subprocess

    from conftest import REPO, python_env, run_args
    from scale.eval.__main__ import main as eval_main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    env = python_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": str(port)})
    done = subprocess.run(run_args("-m", "scale.train", "--config", "recipes/ocl_cpu_tiny.yaml", "engine.name=fsdp",
                                   "model.name=vit_tiny_patch7_28", "train.epochs=1", "train.micro_batch=16",
                                   "data.num_samples=32", "data.num_workers=0", "eval.knn_every_epochs=1",
                                   "train.device=cpu", f"train.output_dir={run}"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    monitor = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if '"kind": "eval"' in line]
    assert len(monitor) == 1 and monitor[0]["step"] == 2
    out = tmp_path / "vit.safetensors"
    assert main(["--checkpoint", str(run), "--out", str(out)]) == 0
    loaded = load_checkpoint(run)
    assert loaded.format == "dcp"
    model = timm_model_from_export(out)  # strict
    assert model.patch_embed.proj.kernel_size == (7, 7)
    assert eval_main(["knn", "--checkpoint", str(run), "--no-progress"]) == 0
    cli = json.loads((run / "checkpoints" / "step_00000002.knn.json").read_text())
    assert cli["top1"] == pytest.approx(monitor[0]["knn_top1"]) and cli["bank"] == 32
