"""bench/ehm_cost.py: EHM's signal and tree shares of an MAE step, rnn vs greedy trees, bad flags in one line."""
import json

import pytest

from bench import ehm_cost  # the repo root is on sys.path (conftest.py)

pytestmark = pytest.mark.bench


def test_tiny_preset_gives_shares_of_the_step_and_identical_trees(tmp_path, capsys):
    out = tmp_path / "ehm_cost.json"
    assert ehm_cost.main(["--presets", "vit_tiny_patch4_28", "--batch", "4", "--steps", "2", "--threads", "1",
                          "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ehm_cost.TABLE_HEADER in printed and "| vit_tiny_patch4_28 | 49 | 4 |" in printed
    data = json.loads(out.read_text())
    assert data["env"]["torch"] and data["env"]["device"] and data["table"][0] == ehm_cost.TABLE_HEADER
    (r,) = data["results"]
    assert (r["preset"], r["num_patches"], r["batch"], r["steps"]) == ("vit_tiny_patch4_28", 49, 4, 2)
    for key in ("signal_per_step", "tree_per_step"):
        assert 0 < r[key] <= 1, key
    assert r["mask_per_step"] == pytest.approx(r["signal_per_step"] + r["tree_per_step"])
    assert r["ehm_step_per_random_step"] > 0 and r["ehm_rest_per_random_step"] > 0 and r["greedy_per_rnn_tree"] > 0
    assert 0 < r["signal_flops_per_random_step_flops"]
    assert r["trees_identical"] is True
    assert r["rounds"]["greedy"] == 48 and r["rounds"]["rnn"] < 48
    assert [len(r["per_step"][m]) for m in ("random", "ehm")] == [2, 2]
    assert "time_mask_signal_s" in r["per_step"]["ehm"][0] and "time_mask_signal_s" not in r["per_step"]["random"][0]


def test_signal_flops_of_vit_b_are_about_30_percent_of_an_mae_step():
    """METHODS.md: a 6-block forward over all 197 tokens is ~+30% on an MAE ViT-B step (512-d x 8 decoder)."""
    from scale.config import load_config
    from scale.trainer import step_plan

    recipe = ehm_cost.mae_recipe("vit_base_patch16")
    assert recipe.name == "mae_vitb16.yaml"
    assert ehm_cost.mae_recipe("vit_tiny_patch4_28").name == "mae_fashion_mnist_cpu.yaml"
    plan = step_plan(load_config(recipe, ["mask.name=ehm", "mask.ehm.blocks=6", "model.train_patch_embed=true"]))
    assert plan.visible_per_group == 49
    assert 0.28 < plan.mask_flops / (plan.flops - plan.mask_flops) < 0.32


@pytest.mark.parametrize("argv, named", [
    (["--presets", "vit_nope"], "--presets vit_nope"),
    (["--steps", "x"], "--steps"),
    (["--device", "tpu"], "--device"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, argv, named):
    out = tmp_path / "never.json"
    assert ehm_cost.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and err[0].startswith("ehm_cost.py: error:")
    if argv[0] == "--presets":
        assert "vit_base_patch16" in err[0]  # the allowed values
    assert not out.exists()
