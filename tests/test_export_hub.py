"""`scale-export --hub-dir DIR`: a folder that timm ("local-dir:DIR") and the Hugging Face hub load as is."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from scale.config import to_dict
from scale.eval.results import results_path, write_results
from scale.export import main
from test_export import STEP, _module, _save

HUB_FILES = {"config.json", "model.safetensors", "README.md"}


def _checkpoint(tmp_path: Path, edit_config=lambda config: None):
    """A tiny run's checkpoint (single-process layout) and the module it holds."""
    cfg, module = _module(tmp_path)
    config = to_dict(cfg)
    edit_config(config)
    ckpt = _save(cfg, lambda d: torch.save({"model": module.state_dict(), "optimizer": {},
                                            "extra": {"config": config}}, d / "state.pt"))
    return cfg, module, ckpt


def test_hub_dir_loads_in_timm_with_the_checkpoints_features(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local-dir: nothing is fetched
    cfg, module, ckpt = _checkpoint(tmp_path)
    hub = tmp_path / "out" / "vit-ocl"
    assert main(["--checkpoint", str(ckpt), "--hub-dir", str(hub)]) == 0
    assert f"local-dir:{hub}" in capsys.readouterr().out
    assert {p.name for p in hub.iterdir()} == HUB_FILES
    assert [p.name for p in hub.parent.iterdir()] == ["vit-ocl"]  # no staging folder left beside it

    model = timm.create_model(f"local-dir:{hub}", pretrained=True).eval()
    module.eval()
    spec = module.encoder.spec
    images = torch.randn(3, spec.in_chans, spec.img_size, spec.img_size)
    with torch.no_grad():
        tokens = model.forward_features(images)
        torch.testing.assert_close(tokens, module.encoder.forward_features(images))
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), module.encoder(images)[:, 0])
    assert model.num_classes == 0

    config = json.loads((hub / "config.json").read_text())
    assert config["model_args"]["patch_size"] == spec.patch_size and config["model_args"]["depth"] == spec.depth
    pretrained = config["pretrained_cfg"]  # preprocessing: the run's normalisation, the whole image resized
    assert (pretrained["mean"], pretrained["std"]) == (list(cfg.data.mean), list(cfg.data.std))
    assert pretrained["input_size"] == [spec.in_chans, spec.img_size, spec.img_size]
    assert pretrained["tag"] == f"scale_{cfg.objective.name}"  # not the untrained architecture's augreg tag

    card = (hub / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card
    for fact in (f"objective {cfg.objective.name}, masks {cfg.mask.name}", f"step {STEP}", cfg.model.name,
                 "Pre-training data:** synthetic", "## Training recipe"):
        assert fact in card
    assert "None: the run holds no evaluation of this checkpoint" in card


def test_hub_card_holds_the_runs_knn_and_linear_probe_results(tmp_path):
    _, _, ckpt = _checkpoint(tmp_path)
    write_results(results_path(ckpt, "knn"), {"kind": "knn", "top1": 61.25, "top5": 90.5, "k": 20,
                                              "temperature": 0.07, "bank": 256, "queries": 64})
    write_results(results_path(ckpt, "linprobe"), {"kind": "linprobe", "top1": 70.125, "top5": 95.0, "steps": 90})
    with open(ckpt.parent.parent / "metrics.jsonl", "a") as f:  # the trainer's kNN monitor at this step
        f.write(json.dumps({"step": STEP, "kind": "eval", "knn_top1": 55.5, "knn_top5": 80.0,
                            "knn_bank": 128.0, "knn_queries": 32.0}) + "\n")
        f.write(json.dumps({"step": STEP - 1, "kind": "eval", "knn_top1": 11.0}) + "\n")  # another step's
    hub = tmp_path / "hub"
    assert main(["--checkpoint", str(ckpt), "--hub-dir", str(hub)]) == 0
    card = (hub / "README.md").read_text()
    assert "| kNN (`scale-eval knn`) | 61.25 | 90.50 | k=20, T=0.07, 256 bank / 64 query images |" in card
    assert "| linear probe (`scale-eval linprobe`) | 70.12 | 95.00 | 90 head steps |" in card
    assert "| kNN monitor during training | 55.50 | 80.00 | 128 bank / 32 query images" in card
    assert "11.00" not in card and "None: the run holds no evaluation" not in card


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("case", ["non-empty folder", "file", "below a file", "symbolic link"])
def test_hub_dir_that_would_lose_or_hide_something_is_refused_before_any_work(tmp_path, capsys, case):
    """One line, exit 2, before the checkpoint is read (it does not even exist here); nothing there changes."""
    hub = tmp_path / "hub"
    if case == "non-empty folder":
        hub.mkdir()
        (hub / "config.json").write_text("a previous export")
    elif case == "file":
        hub.write_text("a file")
    elif case == "below a file":
        (tmp_path / "plain").write_text("a file")
        hub = tmp_path / "plain" / "hub"
    else:
        (tmp_path / "elsewhere").mkdir()
        hub.symlink_to(tmp_path / "elsewhere")
    before = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else b"") for p in tmp_path.rglob("*"))
    assert main(["--checkpoint", str(tmp_path / "no-such-run"), "--hub-dir", str(hub)]) == 2
    err = _one_line_error(capsys)
    assert f"--hub-dir {hub}" in err and "no-such-run" not in err
    assert sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else b"")
                  for p in tmp_path.rglob("*")) == before


def test_hub_dir_in_an_unwritable_folder_is_refused(tmp_path, capsys, monkeypatch):
    """The permission check itself is os.access (tests run as root, which chmod does not stop)."""
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    assert main(["--checkpoint", str(tmp_path / "no-such-run"), "--hub-dir", str(locked / "a" / "hub")]) == 2
    assert f"{locked} is not writable" in _one_line_error(capsys)
    assert not (locked / "a").exists()


def test_hub_dir_that_is_an_empty_folder_is_filled(tmp_path):
    _, _, ckpt = _checkpoint(tmp_path)
    hub = tmp_path / "hub"
    hub.mkdir()
    assert main(["--checkpoint", str(ckpt), "--hub-dir", str(hub)]) == 0
    assert {p.name for p in hub.iterdir()} == HUB_FILES


def test_damaged_results_file_is_one_line_naming_it_and_writes_nothing(tmp_path, capsys):
    _, _, ckpt = _checkpoint(tmp_path)
    results_path(ckpt, "linprobe").write_text('{"top1": "high"')
    hub = tmp_path / "hub"
    assert main(["--checkpoint", str(ckpt), "--hub-dir", str(hub)]) == 2
    assert f"{results_path(ckpt, 'linprobe')}: not a scale.eval linprobe results file" in _one_line_error(capsys)
    assert not hub.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".hub.partial")]


def test_run_normalisation_that_timm_cannot_use_is_one_line_naming_the_key(tmp_path, capsys):
    """The saved run config is read from a file: data.mean becomes timm's preprocessing, so it is checked."""
    _, _, ckpt = _checkpoint(tmp_path, lambda config: config["data"].update(mean=[0.5, 0.5]))  # in_chans=1
    hub = tmp_path / "hub"
    assert main(["--checkpoint", str(ckpt), "--hub-dir", str(hub)]) == 2
    assert "its run config's data.mean must be one number or one per input channel (1), got [0.5, 0.5]" in _one_line_error(capsys)
    assert not hub.exists()
