"""Evolved Hierarchical Masking: the patch tree, its cut, the depth schedule, the masks, exactness."""
import itertools
import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from conftest import tiny_config
from scale.config import ConfigError, MaskConfig, load_config
from scale.masking import EHMConfig
from scale.masking import MaskContext, build_mask_generator
from scale.masking.evolved import visit_order
from scale.masking.hierarchy import (TREE_BUILDERS, greedy_average_linkage, quantize_similarity,
                                     reciprocal_nn_average_linkage)
from scale.masking.similarity import attention_row_similarity, patch_similarity


def brute_force_tree(q):
    """Average linkage by its definition on an integer similarity: clusters as leaf lists, every
    pair's mean recomputed from the leaves, ties to the pair of smallest leaves. -> the encoding."""
    n = len(q)
    clusters = {i: ([i], 1) for i in range(n)}  # slot (smallest leaf) -> (leaves, level)
    parent, merge_level, left_size = [-1] * n, [0] * n, [0] * n
    while len(clusters) > 1:
        best = None
        for a, b in itertools.combinations(sorted(clusters), 2):
            la, lb = clusters[a][0], clusters[b][0]
            mean = sum(q[i][j] for i in la for j in lb) / (len(la) * len(lb))  # exact int / int, rounded once
            if best is None or mean > best[0]:
                best = (mean, a, b)
        _, a, b = best
        (la, level_a), (lb, level_b) = clusters[a], clusters.pop(b)
        parent[b], merge_level[b], left_size[b] = a, max(level_a, level_b) + 1, len(la)
        clusters[a] = (la + lb, max(level_a, level_b) + 1)
    return parent, merge_level, left_size


def symmetric(batch, n, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = {"random": lambda: torch.rand(batch, n, n, generator=g),
         "ties": lambda: torch.randint(0, 3, (batch, n, n), generator=g).float(),
         "constant": lambda: torch.ones(batch, n, n)}[kind]()
    return (s + s.transpose(1, 2)) / 2


@pytest.mark.parametrize("kind", ["random", "ties", "constant"])
@pytest.mark.parametrize("n", [2, 7, 16])
def test_both_tree_forms_equal_the_brute_force_definition(kind, n):
    similarity = symmetric(3, n, kind, seed=n)
    q = quantize_similarity(similarity)  # the builders' integers: the diagonal never counts
    trees = {name: build(similarity) for name, build in TREE_BUILDERS.items()}
    for b in range(3):
        expected = brute_force_tree(q[b].long().tolist())
        for name, tree in trees.items():
            got = (tree.parent[b].tolist(), tree.merge_level[b].tolist(), tree.left_size[b].tolist())
            assert got == expected, (name, b)


def test_reciprocal_nn_form_is_identical_in_far_fewer_rounds_at_vitb_grid():
    similarity = symmetric(4, 196, "random", seed=3)
    greedy, rnn = greedy_average_linkage(similarity), reciprocal_nn_average_linkage(similarity)
    assert torch.equal(greedy.parent, rnn.parent) and torch.equal(greedy.merge_level, rnn.merge_level)
    assert torch.equal(greedy.left_size, rnn.left_size)
    assert greedy.rounds == 195 and rnn.rounds < 60


def test_patch_similarity_drops_cls_and_symmetrises():
    attention = torch.rand(2, 5, 5)
    s = patch_similarity(attention)
    assert s.shape == (2, 4, 4) and s.dtype == torch.float32
    assert torch.equal(s, s.transpose(1, 2)) and torch.all(torch.diagonal(s, dim1=1, dim2=2) == 0)
    torch.testing.assert_close(s[:, 0, 1], (attention[:, 1, 2] + attention[:, 2, 1]) / 2)


def explicit_nodes(tree, b):
    """(leaves, level, left leaves, right leaves) of every internal node, and the root's leaves."""
    parent, level = tree.parent[b].tolist(), tree.merge_level[b].tolist()
    clusters, nodes = {i: [i] for i in range(len(parent))}, []
    for lv in sorted(set(level) - {0}):
        for x in [x for x in range(len(parent)) if level[x] == lv]:
            left, right = clusters[parent[x]], clusters.pop(x)
            nodes.append((set(left + right), lv, left, right))
            clusters[parent[x]] = left + right
    return nodes, clusters[0]


def test_cut_and_depth_first_order_follow_the_tree():
    tree = reciprocal_nn_average_linkage(symmetric(3, 12, "random", seed=1))
    for b in range(3):
        nodes, root = explicit_nodes(tree, b)
        height = int(tree.height[b])
        assert height == max(lv for _, lv, _, _ in nodes)
        for d in range(1, height + 1):
            labels = tree.cut(torch.full((3,), d))[b].tolist()
            for i in range(12):  # highest ancestor of level <= d, named by its smallest leaf
                below = [leaves for leaves, lv, _, _ in nodes if i in leaves and lv <= d]
                assert labels[i] == min(max(below, key=len) if below else {i})
        assert len(set(tree.cut(torch.ones(3, dtype=torch.long))[b].tolist())) == 12
        assert set(tree.cut(torch.full((3,), height))[b].tolist()) == {0}

        def depth_first(leaves):
            if len(leaves) == 1:
                return leaves
            node = next(n for n in nodes if n[0] == set(leaves))
            return depth_first(node[2]) + depth_first(node[3])
        order = depth_first(root)
        assert tree.leaf_positions()[b].tolist() == [order.index(i) for i in range(12)]


def ehm_generator(name="ehm", ratio=0.75, grid=7, **ehm):
    return build_mask_generator(MaskConfig(name=name, ratio=ratio, ehm=EHMConfig(**ehm)), grid)


def attention_of(images_per_batch, n, seed):
    """A stand-in model signal: a fixed random attention per image (by its first pixel value)."""
    def signal(images):
        out = []
        for x in images:
            g = torch.Generator().manual_seed(int(x.flatten()[0].item() * 1e6) + seed)
            out.append(torch.softmax(torch.randn(n + 1, n + 1, generator=g) * 3, dim=-1))
        return torch.stack(out)
    return signal


def context(images, step=0, progress=0.5, seed=0, signal=None):
    n = 49
    return MaskContext(generator=torch.Generator().manual_seed(1000 + step), device=torch.device("cpu"), step=step,
                       progress=progress, epoch_progress=progress, images=images,
                       model_signal=signal or attention_of(len(images), n, seed))


def test_depth_schedule_evolves_is_fixed_or_capped():
    height = torch.tensor([10, 21, 3, 1])
    ctx = MaskContext(generator=torch.Generator(), device=torch.device("cpu"), progress=0.55, epoch_progress=0.5)
    assert ehm_generator().depth(height, ctx).tolist() == [5, 10, 1, 1]  # max(1, floor(0.5 H)): epochs
    assert ehm_generator(progress="step").depth(height, ctx).tolist() == [5, 11, 1, 1]
    assert ehm_generator(depth="fixed", fixed_depth=0.2).depth(height, ctx).tolist() == [2, 4, 1, 1]
    assert ehm_generator(max_depth=0.3, progress="step").depth(height, ctx).tolist() == [3, 6, 1, 1]
    early = replace(ctx, progress=0.0, epoch_progress=0.0)
    assert ehm_generator().depth(height, early).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("name,ratio,groups", [("ehm", 0.75, 1), ("ehm", 0.25, 1), ("ehm_two_group", 0.3, 2),
                                               ("ehm_drop_two_group", 0.3, 2)])
def test_masks_hold_exactly_r_n_whole_parts_and_one_depth_first_prefix(name, ratio, groups):
    images = torch.rand(6, 1, 28, 28)
    gen = ehm_generator(name, ratio)
    ctx = context(images)
    masks = gen(6, ctx)
    keep = int(49 * (1 - ratio)) // groups * groups
    assert masks.group_ids.shape == (6, groups, keep // groups) and masks.masked_ids.shape == (6, 49 - keep)
    for b in range(6):  # a partition of the patches
        assert sorted(masks.group_ids[b].flatten().tolist() + masks.masked_ids[b].tolist()) == list(range(49))
    # Masked = whole parts of the tree cut at d, plus a depth-first prefix of one more part.
    tree = TREE_BUILDERS["rnn"](patch_similarity(ctx.model_signal(images)))
    parts = tree.cut(gen.depth(tree.height, ctx))
    # Each merge's child order is drawn from the step's generator: replay it (tests/test_ehm_order.py checks
    # that within a part this order is depth-first).
    position = visit_order(tree, parts, torch.Generator().manual_seed(1000)).argsort(dim=1)
    for b in range(6):
        masked = set(masks.masked_ids[b].tolist())
        cut = [p for p in set(parts[b].tolist())
               if 0 < len(masked & {i for i in range(49) if parts[b, i] == p}) < int((parts[b] == p).sum())]
        assert len(cut) <= 1
        for p in cut:
            members = sorted((i for i in range(49) if parts[b, i] == p), key=lambda i: int(position[b, i]))
            hidden = [i in masked for i in members]
            assert hidden == sorted(hidden, reverse=True)  # masked first in the visit order
    assert {"ehm_depth", "ehm_height", "ehm_parts", "ehm_tree_rounds"} <= set(masks.metrics)


def test_two_groups_come_from_one_ordering():
    images = torch.rand(4, 1, 28, 28)
    ctx = context(images)
    gen = ehm_generator("ehm_two_group", 0.3)
    masks = gen(4, ctx)
    tree = TREE_BUILDERS["rnn"](patch_similarity(ctx.model_signal(images)))
    order = visit_order(tree, tree.cut(gen.depth(tree.height, ctx)), torch.Generator().manual_seed(1000))
    assert torch.equal(torch.cat([masks.masked_ids, masks.group_ids.flatten(1)], dim=1), order)


@pytest.mark.slow
@pytest.mark.parametrize("name,random_name,ratio", [("ehm", "random", 0.67), ("ehm_two_group", "random_two_group", 0.67),
                                                    ("ehm_drop_two_group", "random_two_group", 0.67)])
def test_at_depth_one_each_generator_is_its_random_counterpart_in_distribution(name, random_name, ratio):
    """3 x 3 grid: the (masked set, group A, group B) outcome must be uniform, as the random generator's."""
    draws = 6000
    images = torch.rand(draws, 1, 12, 12)
    gen = build_mask_generator(MaskConfig(name=name, ratio=ratio), 3)
    ref = build_mask_generator(MaskConfig(name=random_name, ratio=ratio), 3)
    ctx = MaskContext(generator=torch.Generator().manual_seed(7), device=torch.device("cpu"), progress=0.0,
                      epoch_progress=0.0, images=images, model_signal=attention_of(draws, 9, seed=0))
    random_ctx = MaskContext(generator=torch.Generator().manual_seed(8), device=torch.device("cpu"))
    keep, groups = gen.num_keep, gen.num_groups
    cells = math.comb(9, keep) * (math.comb(keep, keep // 2) if groups == 2 else 1)  # (group A, group B) ordered
    df = cells - 1
    for label, masks in (("ehm", gen(draws, ctx)), ("random", ref(draws, random_ctx))):
        counts = Counter(tuple(tuple(sorted(g.tolist())) for g in row) for row in masks.group_ids)
        assert len(counts) == cells, label
        expected = draws / cells
        chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
        assert chi2 < df + 5 * math.sqrt(2 * df), (label, chi2, df)  # chi-square(df): mean df, sd sqrt(2 df)
    # ... and a visibly non-uniform generator fails the same test (the test can fail): deep parts of one
    # tree (every image alike; over random trees, random child orders make even deep cuts uniform)
    deep = build_mask_generator(MaskConfig(name=name, ratio=ratio, ehm=EHMConfig(depth="fixed", fixed_depth=0.6)), 3)
    one_tree = replace(ctx, generator=torch.Generator().manual_seed(9), images=images[:1].expand_as(images))
    counts = Counter(tuple(tuple(sorted(g.tolist())) for g in row) for row in deep(draws, one_tree).group_ids)
    expected = draws / cells
    assert sum((counts.get(k, 0) - expected) ** 2 / expected for k in set(counts)) + expected * (cells - len(counts)) > df + 5 * math.sqrt(2 * df)


def test_signal_is_computed_in_fixed_size_sub_batches(tmp_path):
    """Fixed-size signal sub-batches: an image's similarity is the same whichever batch it sits in."""
    from scale.pretraining import build_pretrain_module

    module = build_pretrain_module(tiny_config(tmp_path, "mask.name=ehm_two_group", "mask.ehm.signal_batch=4"))
    gen = build_mask_generator(MaskConfig(name="ehm_two_group", ehm=EHMConfig(signal_batch=4)), 7)
    request = gen.needs.model_signal
    images = torch.randn(12, 1, 28, 28)

    def similarity(x):
        return gen.similarity(MaskContext(torch.Generator(), torch.device("cpu"), images=x,
                                          model_signal=lambda chunk: module.model_signal(chunk, request)))
    whole = similarity(images)
    assert torch.equal(whole, torch.cat([similarity(images[:8]), similarity(images[8:])]))
    images = torch.rand(8, 1, 28, 28)
    calls = []

    def signal(x):  # a batch of 8 is asked for in two sub-batches of 4
        calls.append(len(x))
        return attention_of(len(x), 49, 0)(x)
    gen = ehm_generator(signal_batch=4)
    ctx = context(images, signal=signal)
    gen(8, ctx)
    assert calls == [4, 4]


def test_ehm_config_errors_name_the_key(tmp_path):
    for key, value in (("tree", "kruskal"), ("similarity", "cosine"), ("depth", "random"), ("progress", "batch"), ("fixed_depth", "1.5"),
                       ("max_depth", "0"), ("source", "teacher"), ("ema_decay", "1.0"), ("blocks", "0")):
        with pytest.raises(ConfigError, match=f"mask.ehm.{key}"):
            load_config(None, [f"mask.ehm.{key}={value}"])


def test_attention_signal_is_eval_semantics_and_leaves_the_global_rng_alone(tmp_path):
    from scale.masking import SignalRequest
    from scale.pretraining import build_pretrain_module

    module = build_pretrain_module(tiny_config(tmp_path, "model.drop_path_rate=0.5", "mask.name=ehm_two_group"))
    module.train()
    images = torch.randn(5, 1, 28, 28)
    state = torch.get_rng_state()
    first = module.model_signal(images, SignalRequest("attention", blocks=6))
    assert torch.equal(torch.get_rng_state(), state)  # no draw: masks never shift the step's drop path
    second = module.model_signal(images, SignalRequest("attention", blocks=6))
    assert torch.equal(first, second) and module.training  # no drop path, and train mode restored
    assert first.shape == (5, 50, 50) and first.dtype == torch.float32
    torch.testing.assert_close(first.sum(-1), torch.ones(5, 50))  # softmax rows, averaged
    shallow = module.model_signal(images, SignalRequest("attention", blocks=2))
    capped = module.model_signal(images, SignalRequest("attention", blocks=60))  # capped by depth
    assert not torch.equal(shallow, first) and torch.equal(capped, first)


def test_attention_row_similarity_compares_what_patches_attend_to():
    # Patches 1 and 2 attend alike (to 3), patch 3 attends to 1: rows, not attention received, decide.
    attention = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 0.1, 0.9], [0, 0.1, 0, 0.9], [0, 0.9, 0.1, 0]]])
    s = attention_row_similarity(attention)
    assert torch.equal(s, s.transpose(1, 2)) and torch.all(torch.diagonal(s, dim1=1, dim2=2) == 0)
    assert s[0, 0, 1] > 0.9 > s[0, 0, 2]
    # Key-dominated attention (every query attends by key saliency) chains under symmetrised attention
    saliency = torch.softmax(torch.randn(1, 17, generator=torch.Generator().manual_seed(0)) * 2, dim=-1)
    keyed = (saliency.expand(17, 17) * 0.9 + 0.1 * torch.rand(17, 17, generator=torch.Generator().manual_seed(1)) / 17)
    keyed = (keyed / keyed.sum(-1, keepdim=True))[None]
    assert int(reciprocal_nn_average_linkage(patch_similarity(keyed)).height) == 16  # one chain: H = N
    assert ehm_generator(similarity="attention_rows").patch_similarity is attention_row_similarity


def test_grid_masking_keeps_one_phase_of_the_2x2_lattice():
    gen = build_mask_generator(MaskConfig(name="grid", ratio=0.75), 4)  # even grid: 4 phases of 4
    masks = gen(400, MaskContext(torch.Generator().manual_seed(0), torch.device("cpu")))
    visible = masks.group_ids[:, 0]
    phase = (visible // 4 % 2) * 2 + visible % 4 % 2
    assert visible.shape == (400, 4) and torch.all(phase == phase[:, :1])  # one phase, one per 2x2 cell
    counts = Counter(phase[:, 0].tolist())
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 60  # every phase drawn
    odd = build_mask_generator(MaskConfig(name="grid", ratio=0.75), 7)(50, MaskContext(torch.Generator(), torch.device("cpu")))
    v = odd.group_ids[:, 0]
    spans = [len(set(((row // 7 % 2) * 2 + row % 7 % 2).tolist())) for row in v]
    assert v.shape == (50, 12) and max(spans) <= 2 and min(spans) == 1
