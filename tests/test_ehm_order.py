"""Issue 25, point 10: EHM's last part as the paper draws it, and its depth in exact arithmetic.

Only the last part visited is cut. With each merge's children in a fixed order (smaller leaves
first) its masked end was always the same one: on chain-like trees, the top rows. The child order is
now drawn per merge from the step's generator. The depth d = max(1, floor(progress x H)) is computed
in integers from the trainer's exact progress fraction.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from scale.config import MaskConfig
from scale.masking import EHMConfig
from scale.masking import build_mask_generator
from scale.masking.evolved import visit_order
from scale.masking.hierarchy import PatchTree, reciprocal_nn_average_linkage
from scale.trainer import Trainer
from conftest import tiny_config


def chain_tree(batch: int, n: int) -> PatchTree:
    """The most chain-like tree: patch k joins the cluster of patches 0..k-1, at level k + 1."""
    slots = torch.arange(n).expand(batch, n)
    return PatchTree(parent=torch.where(slots > 0, 0, -1), merge_level=torch.where(slots > 0, slots + 1, 0),
                     left_size=slots.clone(), rounds=n - 1)


def test_the_cut_part_of_a_chain_is_masked_from_a_random_end():
    """One part (d = H), r = 0.75 of N = 16: the masked 12 are the first 12 of a depth-first order.
    A random child order puts patch k first or last among patches 0..k: patch 15 leads with
    probability 1/2, and patch 0 has Binomial(15, 1/2) patches before it. The fixed order masked
    patch 0 always and patch 15 never."""
    draws, n, masked = 8000, 16, 12
    tree = chain_tree(draws, n)
    parts = tree.cut(tree.height)
    assert (parts == 0).all()  # one part: the whole image
    order = visit_order(tree, parts, torch.Generator().manual_seed(0))
    is_masked = torch.zeros(draws, n, dtype=torch.bool).scatter_(1, order[:, :masked], True)
    frequency = is_masked.float().mean(dim=0)
    expected = {0: sum(math.comb(n - 1, k) for k in range(masked)) / 2 ** (n - 1), n - 1: 0.5}
    for patch, p in expected.items():
        assert abs(frequency[patch].item() - p) < 4 * math.sqrt(p * (1 - p) / draws), (patch, frequency[patch], p)
    assert is_masked.sum(dim=1).eq(masked).all()  # exactly r x N, as before


def depth_first_with_swaps(tree: PatchTree, b: int, swapped: list) -> list:
    """The definition: each slot's merges in level order, the absorbed cluster after the cluster so
    far, or before it where its merge is swapped."""
    parent, level = tree.parent[b].tolist(), tree.merge_level[b].tolist()
    merges = {a: sorted((level[x], x) for x in range(len(parent)) if parent[x] == a) for a in range(len(parent))}

    def leaves(slot: int) -> list:
        seq = [slot]
        for _, absorbed in merges[slot]:
            seq = leaves(absorbed) + seq if swapped[absorbed] else seq + leaves(absorbed)
        return seq
    return leaves(0)


@pytest.mark.parametrize("n", [12, 49])
def test_leaf_positions_with_drawn_child_orders_are_depth_first(n):
    generator = torch.Generator().manual_seed(n)
    similarity = torch.rand(4, n, n, generator=generator)
    tree = reciprocal_nn_average_linkage((similarity + similarity.transpose(1, 2)) / 2)
    for _ in range(3):
        swapped = torch.rand(4, n, generator=generator) < 0.5
        positions = tree.leaf_positions(swapped)
        for b in range(4):
            order = depth_first_with_swaps(tree, b, swapped[b].tolist())
            assert positions[b].tolist() == [order.index(i) for i in range(n)]


def test_visit_order_keeps_every_part_contiguous_and_follows_the_generator():
    n = 49
    similarity = torch.rand(3, n, n, generator=torch.Generator().manual_seed(5))
    tree = reciprocal_nn_average_linkage((similarity + similarity.transpose(1, 2)) / 2)
    parts = tree.cut(torch.full((3,), 4))
    order = visit_order(tree, parts, torch.Generator().manual_seed(1))
    assert torch.equal(order, visit_order(tree, parts, torch.Generator().manual_seed(1)))  # replayable
    assert not torch.equal(order, visit_order(tree, parts, torch.Generator().manual_seed(2)))
    for b in range(3):
        labels = parts[b][order[b]].tolist()  # the part of each patch, in visit order
        runs = [label for i, label in enumerate(labels) if i == 0 or labels[i - 1] != label]
        assert len(runs) == len(set(labels))  # each part visited in one run


def test_depth_is_exact_over_every_epoch_and_height_of_a_300_epoch_schedule(tmp_path):
    """d = max(1, floor(e / 300 x H)) for the trainer's own progress at every completed epoch e and every
    tree height H up to 199 (a 15 x 15 grid): float arithmetic put d one level low at 15 of these 59,700."""
    trainer = Trainer(tiny_config(tmp_path, "train.epochs=300", "data.num_samples=64"))
    ehm = build_mask_generator(MaskConfig(name="ehm", ratio=0.75, ehm=EHMConfig()), 15)
    heights = torch.arange(1, 200)
    wrong = []
    for epoch in range(300):
        trainer.step = epoch * trainer.steps_per_epoch
        depth = ehm.depth(heights, trainer.mask_context(None))
        exact = [max(1, epoch * h // 300) for h in heights.tolist()]
        wrong += [(epoch, h) for h, d, x in zip(heights.tolist(), depth.tolist(), exact) if d != x]
    assert wrong == []


def test_depth_by_steps_and_with_a_cap_is_exact():
    ehm = build_mask_generator(MaskConfig(name="ehm", ratio=0.75, ehm=EHMConfig(progress="step", max_depth=0.7)), 15)
    heights = torch.arange(1, 200)
    generator = torch.Generator()
    from scale.masking import MaskContext

    for step, total in ((87, 300), (1, 3), (2, 3), (7, 7)):
        context = MaskContext(generator=generator, device=torch.device("cpu"), progress=Fraction(step, total))
        expected = [max(1, min(step * h // total, 7 * h // 10)) for h in heights.tolist()]
        assert ehm.depth(heights, context).tolist() == expected
