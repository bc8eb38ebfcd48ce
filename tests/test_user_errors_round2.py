"""Issue 25, point 7 (the last tracebacks) and point 8 (untrusted model kwargs): each a one-line
user error, or a skipped-and-recorded file, where a traceback used to be."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scale.data.image_folder import list_image_folder
from scale.shards import imagefolder


def save_jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


# ----------------------------------------------------------------------------- symlink loops of files

def tree_with_a_file_link_loop(root: Path) -> Path:
    """cat/ and dog/ with one real image each, cat/a.jpg -> b.jpg -> a.jpg, and a top-level loop."""
    save_jpeg(root / "cat" / "0.jpg", 1)
    save_jpeg(root / "dog" / "0.jpg", 2)
    (root / "cat" / "a.jpg").symlink_to("b.jpg")
    (root / "cat" / "b.jpg").symlink_to("a.jpg")
    (root / "loop").symlink_to("loop")  # a class-level entry that resolves to nothing
    return root


def test_converter_skips_and_records_a_symlink_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tree_with_a_file_link_loop(tmp_path / "src")
    out = tmp_path / "out"
    assert imagefolder.main(["--src", str(src), "--out", str(out), "--workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_samples"] == 2 and manifest["classes"] == {"cat": 0, "dog": 1}
    skipped = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(skipped) == {"cat/a.jpg", "cat/b.jpg", "loop"}
    assert all("symlink loop" in reason for reason in skipped.values())
    assert "Traceback" not in capsys.readouterr().err


def test_image_folder_loader_skips_and_logs_a_symlink_loop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tree_with_a_file_link_loop(tmp_path / "src")
    with caplog.at_level(logging.WARNING, logger="scale.data.image_folder"):
        files, labels, classes = list_image_folder(root)
    assert files == ["cat/0.jpg", "dog/0.jpg"] and labels == [0, 1] and classes == ["cat", "dog"]
    logged = caplog.text
    assert "cat/a.jpg: a symlink loop" in logged and "cat/b.jpg: a symlink loop" in logged


# ----------------------------------------------------------------------------- eval outputs, checked first

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-step OCL run's final checkpoint."""
    from scale.trainer import Trainer
    from conftest import tiny_config

    cfg = tiny_config(tmp_path_factory.mktemp("eval_out"), "model.name=vit_tiny_patch7_28", "data.num_samples=64",
                      "train.epochs=1", "train.ckpt_every=100")
    return Trainer(cfg).fit().last_checkpoint


def no_evaluation(*args, **kwargs):
    raise AssertionError("the evaluation ran before its outputs were checked")


@pytest.mark.parametrize("command,option,target", [
    ("knn", "--out", "a folder"),
    ("linprobe", "--out", "below a file"),
    ("finetune", "--save-model", "a folder"),
])
def test_eval_checks_its_outputs_before_evaluating(tiny_checkpoint: str, tmp_path: Path, command: str, option: str,
                                                   target: str, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import scale.eval.__main__ as cli
    from scale.eval import finetune, linear_probe

    monkeypatch.setattr(cli, "run_knn", no_evaluation)
    monkeypatch.setattr(linear_probe, "run_linear_probe", no_evaluation)
    monkeypatch.setattr(finetune, "run_finetune", no_evaluation)
    (tmp_path / "a_file").write_text("")
    path = tmp_path if target == "a folder" else tmp_path / "a_file" / "result.json"
    recipe = {"knn": [], "linprobe": ["--config", "linprobe_fashion_mnist_cpu"],
              "finetune": ["--config", "finetune_vitb16"]}[command]
    assert cli.main([command, "--checkpoint", tiny_checkpoint, *recipe, option, str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"scale.eval {command}: error: {option} {path}: ")
    assert ("is a directory" if target == "a folder" else "is not a directory") in err


# ----------------------------------------------------------------------------- values that cannot train

@pytest.mark.parametrize("overrides,keys", [
    # ASL's loss is mae_weight * L_MAE + align_weight * L_SEM: both 0 trained nothing, silently.
    (["objective.name=asl", "objective.asl.mae_weight=0", "objective.asl.align_weight=0"],
     "objective.asl.mae_weight and objective.asl.align_weight must not both be 0"),
    # MAE and ASL average their loss over the masked patches: none masked was a NaN at step 1.
    (["objective.name=mae", "mask.name=random", "mask.ratio=0"], "mask.ratio must be in (0, 1) for objective.name=mae"),
    (["objective.name=asl", "mask.name=ehm", "mask.ratio=0"], "mask.ratio must be in (0, 1) for objective.name=asl"),
])
def test_values_that_cannot_train_are_refused(overrides: list, keys: str, capsys: pytest.CaptureFixture[str]) -> None:
    from scale import train

    assert train.main(["--print-config", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"scale-train: error: {keys}")


@pytest.mark.parametrize("overrides", [
    ["objective.name=asl", "objective.asl.mae_weight=0"],  # alignment alone still trains
    ["objective.name=asl", "objective.asl.align_weight=0"],  # MAE inside ASL
    ["objective.name=ocl", "mask.ratio=0"],  # OCL's two groups need no masked patch
])
def test_values_that_still_train_are_accepted(overrides: list) -> None:
    from scale.config import load_config

    load_config(None, overrides)


# ----------------------------------------------------------------------------- untrusted model kwargs (point 8)

def crafted_export(path: Path, kwargs) -> Path:
    """A safetensors file whose metadata carries `kwargs` as its timm_kwargs."""
    import torch
    from safetensors.torch import save_file

    save_file({"cls_token": torch.zeros(1, 1, 8)}, str(path), metadata={"format": "pt", "timm_kwargs": json.dumps(kwargs)})
    return path


VIT = {"model_name": "vit_tiny_patch16_224", "num_classes": 0, "global_pool": "token", "img_size": 28,
       "patch_size": 7, "in_chans": 1, "embed_dim": 192, "depth": 1, "num_heads": 3, "mlp_ratio": 4.0}


@pytest.mark.parametrize("kwargs,named", [
    ({**VIT, "checkpoint_path": "/etc/passwd"}, "timm_kwargs key 'checkpoint_path' is not allowed"),
    ({**VIT, "pretrained": True}, "timm_kwargs key 'pretrained' is not allowed"),
    ({**VIT, "pretrained_cfg_overlay": {"file": "/x"}}, "timm_kwargs key 'pretrained_cfg_overlay' is not allowed"),
    ({**VIT, "model_name": "hf-hub:someone/evil"}, "timm_kwargs model_name must be a timm VisionTransformer"),
    ({**VIT, "model_name": "resnet50"}, "timm_kwargs model_name must be a timm VisionTransformer"),
    ({**VIT, "depth": True}, "timm_kwargs depth must be an integer >= 1"),
    ({**VIT, "global_pool": "map"}, "timm_kwargs global_pool must be token or avg"),
    ([1, 2], "timm_kwargs must be a JSON object"),
])
def test_export_timm_kwargs_are_an_allow_list(tmp_path: Path, kwargs, named: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    from scale.errors import UserError
    from scale.export import timm_model_from_export

    def no_model(*args, **kw):
        raise AssertionError(f"timm.create_model was called with {args} {kw}")
    monkeypatch.setattr(timm, "create_model", no_model)
    path = crafted_export(tmp_path / "crafted.safetensors", kwargs)
    with pytest.raises(UserError) as err:
        timm_model_from_export(path)
    assert str(err.value).startswith(f"{path}: {named}") and "\n" not in str(err.value)


def test_export_timm_kwargs_of_our_own_exports_are_allowed(tmp_path: Path) -> None:
    from scale.export import read_export, timm_kwargs
    from scale.models import model_spec

    for name in ("vit_tiny_patch7_28", "vit_base_patch16"):
        kwargs = {**timm_kwargs(model_spec(name)), "num_classes": 10, "global_pool": "avg"}  # a fine-tuned head
        assert read_export(crafted_export(tmp_path / f"{name}.safetensors", kwargs))[1] == kwargs
