"""Component-owned configs and one batch vocabulary (issue 26, points 1 and 2).

Each objective, mask generator, engine and data source declares its config next to its code; a run
carries and checks only the sections of the components it uses; a key set by the user that has no
effect is an error naming the key and why; train.global_batch / train.micro_batch are the batch
keys everywhere, and the old ones (and configs saved by earlier releases) still load.
"""
import logging
import pickle
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, python_env, tiny_config
from scale.config import (ConfigError, DataConfig, MaskConfig, ObjectiveConfig, load_config, saved_batch_keys,
                          to_dict, to_yaml)
from scale.engine import plan_batch
from scale.eval.config import FinetuneRecipe, LinearProbeRecipe, load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
EVAL_RECIPES = {"linprobe": LinearProbeRecipe, "finetune": FinetuneRecipe}
MAE = ("objective.name=mae", "mask.name=random", "mask.ratio=0.75")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_resolves_with_no_ignored_or_old_keys(recipe, caplog):
    """Every key a recipe sets does something (load_config refuses one that does not), and no recipe
    needs a renamed key's note."""
    with caplog.at_level(logging.WARNING, logger="scale.config"):
        kind = EVAL_RECIPES.get(recipe.stem.split("_")[0])
        cfg = load_recipe(kind, recipe) if kind else load_config(recipe)
    assert cfg is not None and not caplog.records, [r.getMessage() for r in caplog.records]


def test_a_run_carries_only_the_sections_of_its_components():
    mae = load_config("mae_vitb16")
    saved = to_dict(mae)
    assert saved["objective"] == {"name": "mae", "decoder": {"dim": 512, "depth": 8, "num_heads": 16,
                                                             "mlp_ratio": 4.0}, "norm_pix_loss": True}
    assert "ehm" not in saved["mask"] and "kappa:" not in to_yaml(mae) and "init_temperature" not in to_yaml(mae)
    assert not hasattr(mae.objective, "kappa")
    ehm = load_config("ehm_mae_vitb16")
    assert ehm.mask.ehm.blocks == 6 and to_dict(ehm)["mask"]["ehm"]["tree"] == "rnn"
    ocl = load_config("ocl_vitb16")
    assert ocl.objective.kappa == 64 and "decoder" not in to_dict(ocl)["objective"]
    # a section is picked by name, in code too, and pickles (the combined class is made at run time)
    assert isinstance(ObjectiveConfig(name="asl").asl.branch, str) and MaskConfig(name="grid").ratio == 0.3
    assert pickle.loads(pickle.dumps(mae)) == mae


@pytest.mark.parametrize("overrides, message", [
    (("objective.name=mae", "objective.kappa=32"), "objective.kappa has no effect: objective.name is mae"),
    (("objective.kappa=32", "objective.name=mae"), "objective.kappa has no effect: objective.name is mae"),
    (("mask.ehm.tree=greedy",), "mask.ehm.tree has no effect: mask.name is random_two_group"),
    (("engine.name=ddp", "engine.zero_stage=2"), "engine.zero_stage has no effect: engine.name is ddp"),
    (("data.name=image_folder", "data.num_classes=5"), "data.num_classes has no effect: data.name is image_folder"),
    (("optim.lr=1e-3", "optim.blr=1e-4"), "optim.blr has no effect: optim.lr is set"),
    (("mask.name=ehm", "mask.ehm.fixed_depth=0.5"), "mask.ehm.fixed_depth has no effect: mask.ehm.depth is evolved"),
    (("mask.name=ehm", "mask.ehm.ema_decay=0.9"), "mask.ehm.ema_decay has no effect: mask.ehm.source is online"),
    (("objective.name=asl", "mask.name=random", "mask.ratio=0.75", "objective.asl.dle_dropout=0.2"),
     "objective.asl.dle_dropout has no effect: objective.asl.branch is aee"),
    (("objective.head.hidden_dim=64",), "objective.head.hidden_dim has no effect: objective.head.layers is 0"),
    (("data.decode=gpu",), "data.decode has no effect: data.name is synthetic"),
    (("data.name=webdataset", "data.root=/x", "data.num_samples=10"),
     "data.num_samples has no effect: data.resampled is false"),
])
def test_a_key_that_would_do_nothing_is_an_error_naming_it(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, list(overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("mask.ehm.tree=oak", "mask.ehm.tree must be rnn or greedy; got 'oak'"),
    ("objective.asl.branch=xyz", "objective.asl.branch must be aee or dle; got 'xyz'"),
    ("objective.name=nope", "objective.name: unknown objective 'nope'; registered: asl, mae, ocl"),
    ("engine.zero_stage=4", "engine.zero_stage must be one of 0, 1, 2, 3; got 4"),
    ("train.precision=fp16", "train.precision must be one of auto, bf16, fp32; got 'fp16'"),
])
def test_choices_are_literal_types_whose_error_names_the_key_and_the_allowed_values(override, message):
    names = {"mask.ehm": "mask.name=ehm", "objective.asl": "objective.name=asl"}
    before = [names[prefix] for prefix in names if override.startswith(prefix)]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*before, "mask.ratio=0.5", override])
    assert message in str(err.value)


def test_the_old_batch_size_loads_as_micro_batch_with_a_one_line_note(caplog):
    with caplog.at_level(logging.WARNING, logger="scale.config"):
        cfg = load_config(None, ["train.batch_size=48"])
    assert cfg.train.micro_batch == 48 and cfg.train.global_batch is None
    assert plan_batch(cfg.train, 4).per_rank_batch == 48 and plan_batch(cfg.train, 4).global_batch == 192
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "train.batch_size is now train.micro_batch" in notes[0] and "\n" not in notes[0]
    with caplog.at_level(logging.WARNING, logger="scale.config"):
        probe = load_recipe(LinearProbeRecipe, None, ["probe.batch_size=64", "probe.encode_chunk=32"])
        tune = load_recipe(FinetuneRecipe, None, ["finetune.batch_size=64", "finetune.micro_batch=32"])
    assert (probe.probe.global_batch, probe.probe.micro_batch, tune.finetune.global_batch) == (64, 32, 64)
    assert "probe.encode_chunk is now probe.micro_batch" in caplog.text
    assert "finetune.batch_size is now finetune.global_batch" in caplog.text


def test_batch_size_on_a_recipe_with_a_global_batch_is_an_error_not_a_silent_4096():
    with pytest.raises(ConfigError, match=r"^train.batch_size=64 has no effect: train.global_batch is set"):
        load_config("mae_vitb16", ["train.batch_size=64"])
    cfg = load_config("mae_vitb16", ["train.micro_batch=64"])  # the new key says what it does
    assert plan_batch(cfg.train, 8, couples_batch=False).per_rank_batch == 512
    assert plan_batch(cfg.train, 8, couples_batch=False).chunk == 64


def test_configs_saved_by_earlier_releases_still_load(tmp_path):
    """meta.json of an older MAE run: every component's section, and train.batch_size."""
    old = to_dict(load_config(None, list(MAE)))
    old["objective"].update(kappa=64.0, head={"layers": 0, "hidden_dim": 1024, "out_dim": 512},
                            asl={"branch": "aee"})
    old["mask"]["ehm"] = {"blocks": 6}
    old["data"]["resampled"] = False
    old["train"] = {**old["train"], "batch_size": 32, "global_batch": None, "micro_batch": None}
    old["eval"]["batch_size"] = old["eval"].pop("micro_batch")
    cfg = load_config(None, base=old)
    assert cfg.objective.name == "mae" and cfg.train.micro_batch == 32 and not hasattr(cfg.objective, "kappa")
    dump = tmp_path / "old_print_config.yaml"  # the old --print-config output: every section, defaults included
    dump.write_text(yaml.safe_dump(old, sort_keys=False))
    assert load_config(dump) == cfg
    old["objective"]["kappa"] = 32.0  # a value the MAE run would ignore: refused, not dropped
    dump.write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.raises(ConfigError, match="objective.kappa has no effect: objective.name is mae"):
        load_config(dump)
    assert saved_batch_keys({"batch_size": 20, "micro_batch": 6}, world_size=2) == {"micro_batch": 6,
                                                                                      "global_batch": 40}
    assert saved_batch_keys({"batch_size": 20, "global_batch": 64}) == {"global_batch": 64}


def test_a_resume_compares_an_old_checkpoints_config_in_todays_keys(tmp_path):
    from scale.trainer.resume_check import config_changes

    new = to_dict(tiny_config(tmp_path, *MAE, "train.micro_batch=16"))
    old = {**new, "train": {**new["train"], "batch_size": 16, "micro_batch": None},
           "objective": {**new["objective"], "kappa": 64.0, "head": {"layers": 0}}}
    assert config_changes(old, new) == []
    old["train"]["batch_size"] = 8
    assert config_changes(old, new) == [("train.micro_batch", 8, 16)]


@pytest.mark.slow
def test_synthetic_data_never_imports_webdataset():
    code = ("import sys; from scale.config import load_config; from scale.data import DATASETS, build_dataset; "
            "import scale.engine, scale.pretraining; "
            "cfg = load_config(None, ['data.mean=[0.5]', 'data.std=[0.25]', 'data.num_samples=16']); "
            "build_dataset(cfg.data, 28, 1); before = 'webdataset' in sys.modules; "
            "DATASETS.get('webdataset'); print(before, 'webdataset' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=python_env(), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
    assert DataConfig(name="webdataset", resampled=True).resampled is True  # its keys are known without it
