"""scale.mask_pictures: one PNG of EHM's masks next to random ones, for a checkpoint and a few images."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib import image as mpimg

from scale.config import to_dict
from scale.mask_pictures import (DPI, GROUP_TINTS, MASKED_GREY, figure_inches, main, mask_overlay, part_colours,
                                 patch_labels)
from scale.masking import Masks
from scale.masking.hierarchy import TREE_BUILDERS
from scale.trainer import Trainer
from conftest import REPO, python_env, run_args, tiny_config

PATCH = 2  # pixels per patch of the hand-made 2 x 2 grids


@pytest.fixture(scope="module")
def ehm_run(tmp_path_factory) -> Path:
    """A real run directory: OCL with EHM's two groups, 2 steps, a checkpoint at each."""
    cfg = tiny_config(tmp_path_factory.mktemp("ehm"), "mask.name=ehm_two_group", "train.max_steps=2",
                      "train.ckpt_every=1", "train.micro_batch=16")
    Trainer(cfg).fit()
    return Path(cfg.train.output_dir)


def _png(path: Path, rows: int, cols: int) -> np.ndarray:
    pixels = mpimg.imread(path)
    width, height = figure_inches(rows, cols)
    assert pixels.shape[:2] == (round(height * DPI), round(width * DPI))
    rgb = pixels[..., :3]
    assert rgb.std() > 0.1 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20  # not blank: images and colours
    return rgb


@pytest.mark.slow
def test_checkpoint_picture_in_process_and_as_a_module_is_the_same_png(ehm_run, tmp_path, capsys):
    args = ["--checkpoint", str(ehm_run), "--images", "2", "--depths", "0.3", "0.7"]
    first = tmp_path / "a" / "masks.png"
    assert main([*args, "--out", str(first)]) == 0
    assert capsys.readouterr().out.strip() == str(first)
    cols = 1 + 2 + 4  # image, two cuts, MAE random | EHM, OCL random | EHM
    pixels = _png(first, rows=2, cols=cols)
    second = tmp_path / "b.png"
    done = subprocess.run(run_args("-m", "scale.mask_pictures", *args, "--out", str(second)), cwd=REPO,
                          env=python_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(second)
    np.testing.assert_array_equal(_png(second, rows=2, cols=cols), pixels)  # same seed, same masks


def test_random_init_draws_without_a_checkpoint(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path, "mask.name=ehm"))))
    out = tmp_path / "init.png"
    assert main(["--random-init", "--recipe", str(recipe), "--indices", "3", "--depths", "0.5", "--out", str(out)]) == 0
    _png(out, rows=1, cols=1 + 1 + 4)


def _patch(pixels: np.ndarray, index: int) -> np.ndarray:
    row, col = divmod(index, 2)
    return pixels[row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH]


def _flat(pixels: np.ndarray, index: int) -> np.ndarray:
    """The one colour of a patch (asserting it is one)."""
    patch = _patch(pixels, index).reshape(-1, 3)
    assert np.allclose(patch, patch[0])
    return patch[0]


def test_tree_cut_parts_share_a_colour_and_single_patches_stay_plain():
    # Patches 0, 1 alike and 2, 3 alike: the tree joins each pair (level 2), then both (level 3).
    similarity = torch.tensor([[0.0, 0.9, 0.1, 0.1], [0.9, 0.0, 0.1, 0.1],
                               [0.1, 0.1, 0.0, 0.8], [0.1, 0.1, 0.8, 0.0]])
    tree = TREE_BUILDERS["rnn"](similarity[None])
    assert int(tree.height) == 3
    image = np.full((2 * PATCH, 2 * PATCH, 3), 0.5)
    pairs = part_colours(image, tree.cut(torch.tensor([2]))[0], grid_size=2)
    assert np.allclose(_flat(pairs, 0), _flat(pairs, 1)) and np.allclose(_flat(pairs, 2), _flat(pairs, 3))
    assert not np.allclose(_flat(pairs, 0), _flat(pairs, 2))  # touching parts: different colours
    assert not np.allclose(_flat(pairs, 0), 0.5) and not np.allclose(_flat(pairs, 2), 0.5)
    np.testing.assert_array_equal(part_colours(image, tree.cut(torch.tensor([1]))[0], grid_size=2), image)
    whole = part_colours(image, tree.cut(torch.tensor([3]))[0], grid_size=2)
    assert all(np.allclose(_flat(whole, i), _flat(whole, 0)) for i in range(4))


def test_mask_overlay_greys_unseen_patches_and_tints_the_two_groups():
    masks = Masks(group_ids=torch.tensor([[[1], [3]]]), masked_ids=torch.tensor([[0, 2]]))
    labels = patch_labels(masks, num_patches=4)[0]
    assert labels.tolist() == [-1, 0, -1, 1]
    image = np.random.default_rng(0).uniform(size=(2 * PATCH, 2 * PATCH, 3))
    groups = mask_overlay(image, labels, grid_size=2, tints=GROUP_TINTS)
    np.testing.assert_allclose(_flat(groups, 0), MASKED_GREY)
    np.testing.assert_allclose(_flat(groups, 2), MASKED_GREY)
    a, b = _patch(groups, 1) - _patch(image, 1) / 2, _patch(groups, 3) - _patch(image, 3) / 2
    np.testing.assert_allclose(a, np.broadcast_to(GROUP_TINTS[0] / 2, a.shape))  # half image, half tint
    np.testing.assert_allclose(b, np.broadcast_to(GROUP_TINTS[1] / 2, b.shape))
    one_group = mask_overlay(image, labels.clamp(max=0), grid_size=2)  # MAE: visible patches as they are
    np.testing.assert_array_equal(_patch(one_group, 1), _patch(image, 1))
    np.testing.assert_array_equal(_patch(one_group, 3), _patch(image, 3))
    np.testing.assert_allclose(_flat(one_group, 0), MASKED_GREY)


@pytest.mark.parametrize("args, named", [
    (["--checkpoint", "{tmp}/no_such_run"], "{tmp}/no_such_run"),
    (["--random-init"], "--recipe"),
    (["--checkpoint", "{tmp}", "--depths", "0", "0.5"], "--depths"),
    (["--checkpoint", "{tmp}", "--ratio", "1"], "--ratio"),
])
def test_user_errors_are_one_line_naming_the_path_or_flag(tmp_path, capsys, args, named):
    argv = [a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert named.format(tmp=tmp_path) in err
    assert not (tmp_path / "x.png").exists()
