import math
import subprocess
import sys

import pytest

from scale.config import ConfigError, RunConfig, load_config, to_yaml
from conftest import REPO, python_env

RECIPES = sorted((REPO / "recipes").glob("ocl_*.yaml"))


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["optim.blr=1e-4", "model.name=vit_small_patch16", "optim.betas=[0.8,0.9]",
                             "train.max_steps=7", "objective.kappa=inf", "model.train_patch_embed=true"])
    assert cfg.optim.blr == 1e-4 and isinstance(cfg.optim.blr, float)
    assert cfg.model.name == "vit_small_patch16"
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.max_steps == 7
    assert math.isinf(cfg.objective.kappa)
    assert cfg.model.train_patch_embed is True


@pytest.mark.parametrize("override, fragment", [
    ("optim.bogus=1", "unknown config key 'optim.bogus'"),
    ("nothere.x=1", "unknown config key 'nothere'"),
    ("train.micro_batch=abc", "train.micro_batch: expected an integer"),
    ("optim.blr=fast", "optim.blr: expected a number"),
    ("model.train_patch_embed=maybe", "model.train_patch_embed: expected true or false"),
    ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
    ("mask.ratio=1.5", "mask.ratio must be in [0, 1)"),
    ("objective.kappa=0", "objective.kappa must be > 0"),
    ("model.attn_backend=flash", "model.attn_backend must be one of"),
    ("train.micro_batch", "must look like key=value"),
])
def test_bad_overrides_fail_naming_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.bogus=1"])
    assert "blr" in str(err.value) and "weight_decay" in str(err.value)


def test_bad_recipe_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  nmae: vit_base_patch16\n")
    with pytest.raises(ConfigError, match="model.nmae"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_load(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, RunConfig)
    assert load_config(recipe, []).train == cfg.train


def test_recipes_by_name(tmp_path, monkeypatch):
    """A shipped recipe's name (with or without .yaml) is its file in recipes/; an existing file of that
    name in the working folder wins; an unknown name lists the names (scale/recipe_catalog.py)."""
    from scale.eval.config import LinearProbeRecipe, load_recipe
    from scale.recipe_catalog import deepspeed_config, recipe_names

    assert recipe_names() == sorted(path.stem for path in (REPO / "recipes").glob("*.yaml"))
    assert deepspeed_config(3) == REPO / "recipes" / "deepspeed" / "zero3.json"
    monkeypatch.chdir(tmp_path)
    by_path = load_config(REPO / "recipes/ocl_vitl16.yaml")
    assert load_config("ocl_vitl16") == by_path and load_config("ocl_vitl16.yaml", []) == by_path
    assert load_recipe(LinearProbeRecipe, "linprobe_vitl16") == load_recipe(LinearProbeRecipe,
                                                                            REPO / "recipes/linprobe_vitl16.yaml")
    (tmp_path / "ocl_vitl16.yaml").write_text("optim:\n  blr: 1.0e-3\n")
    assert load_config("ocl_vitl16.yaml").optim.blr == 1e-3
    with pytest.raises(ConfigError, match=r"'ocl_vitz99' is neither a file nor a recipe name .*ocl_cpu_tiny, "):
        load_config("ocl_vitz99")
    with pytest.raises(ConfigError, match=r"'nowhere/ocl_vitb16.yaml' does not exist .*recipe names: "):
        load_config("nowhere/ocl_vitb16.yaml")


def test_paper_table9_values():
    b = load_config(REPO / "recipes/ocl_vitb16.yaml")
    l = load_config(REPO / "recipes/ocl_vitl16.yaml")
    h = load_config(REPO / "recipes/ocl_vith16.yaml")
    for cfg in (b, l, h):
        assert cfg.train.epochs == 800 and cfg.optim.warmup_epochs == 40
        assert cfg.optim.blr == 1.5e-4 and cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05
        assert cfg.objective.kappa == 64 and cfg.objective.head.layers == 0
        assert not cfg.model.train_patch_embed
    assert b.mask.ratio == 0.3 and l.mask.ratio == 0.4 and h.mask.ratio == 0.4
    assert b.model.name == "vit_base_patch16" and l.model.name == "vit_large_patch16"
    assert h.model.name == "vit_huge_patch16"


@pytest.mark.slow
def test_print_config_round_trips(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scale.train", "--config", str(REPO / "recipes/ocl_vitb16.yaml"),
                          "--print-config", "optim.blr=2e-4"], capture_output=True, text=True,
                         env=python_env(), cwd=tmp_path, check=True).stdout
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(out)
    cfg = load_config(dumped)
    assert cfg.optim.blr == 2e-4 and cfg.model.name == "vit_base_patch16"
    assert to_yaml(cfg) == out


@pytest.mark.slow
def test_cli_config_error_exits_before_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scale.train", "train.micro_batch=abc",
                           f"train.output_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          env=python_env(), cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.micro_batch" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_renamed_train_keys_still_load(tmp_path):
    """train.contrastive_batch / grad_cache_chunk (earlier releases) load as train.global_batch / micro_batch."""
    cfg = load_config(None, ["train.contrastive_batch=64", "train.grad_cache_chunk=8"])
    assert cfg.train.global_batch == 64 and cfg.train.micro_batch == 8
    recipe = tmp_path / "old.yaml"
    recipe.write_text("train:\n  contrastive_batch: 96\n  grad_cache_chunk: 12\n")
    cfg = load_config(recipe)
    assert cfg.train.global_batch == 96 and cfg.train.micro_batch == 12
    dumped = to_yaml(cfg)
    assert "global_batch: 96" in dumped and "micro_batch: 12" in dumped and "contrastive_batch" not in dumped
    with pytest.raises(ConfigError, match="train.micro_batch"):
        load_config(None, ["train.grad_cache_chunk=0"])
