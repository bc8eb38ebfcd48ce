import pytest
import torch

from scale.config import ConfigError, MaskConfig
from scale.masking import MASK_GENERATORS, MaskContext, MaskGenerator, Masks, RandomGroupMasking, \
    build_mask_generator, step_generator


def context(seed: int, step: int, rank: int, device: torch.device) -> MaskContext:
    return MaskContext(step_generator(seed, step, rank, device), device)


def draw(gen: MaskGenerator, batch: int, seed: int = 0, step: int = 0) -> Masks:
    return gen(batch, context(seed, step, 0, torch.device("cpu")))


@pytest.mark.parametrize("ratio, patches, expected_keep", [(0.3, 196, 136), (0.4, 196, 116), (0.3, 49, 34),
                                                           (0.25, 49, 36), (0.0, 49, 48)])
def test_kept_count_rounded_down_to_even(ratio, patches, expected_keep):
    grid = int(patches ** 0.5)
    gen = RandomGroupMasking(grid, ratio)
    assert gen.num_keep == expected_keep
    m = draw(gen, 3)
    assert m.group_ids.shape == (3, 2, expected_keep // 2)
    assert m.masked_ids.shape == (3, patches - expected_keep)


def test_groups_disjoint_equal_and_never_masked():
    gen = RandomGroupMasking(14, 0.3)
    m = draw(gen, 64)
    for b in range(64):
        a, c = set(m.group_ids[b, 0].tolist()), set(m.group_ids[b, 1].tolist())
        masked = set(m.masked_ids[b].tolist())
        assert len(a) == len(c) == 68
        assert not a & c
        assert not (a | c) & masked
        assert a | c | masked == set(range(196))


def test_every_patch_equally_likely_kept():
    gen = RandomGroupMasking(7, 0.3)
    counts = torch.zeros(49)
    group_counts = torch.zeros(2, 49)
    draws = 4000
    m = draw(gen, draws, seed=1)
    counts.index_add_(0, m.group_ids.reshape(-1), torch.ones(m.group_ids.numel()))
    for g in range(2):
        ids = m.group_ids[:, g].reshape(-1)
        group_counts[g].index_add_(0, ids, torch.ones(ids.numel()))
    p = gen.num_keep / 49
    expected = draws * p
    std = (draws * p * (1 - p)) ** 0.5
    assert (counts - expected).abs().max() < 5 * std, counts
    # each group is an unbiased half: every patch equally likely in either group
    half = draws * p / 2
    assert (group_counts - half).abs().max() < 5 * (draws * p / 2 * (1 - p / 2)) ** 0.5


def test_reproducible_from_seed_and_step():
    gen = RandomGroupMasking(14, 0.3)
    a, b = draw(gen, 8, seed=3, step=5), draw(gen, 8, seed=3, step=5)
    assert torch.equal(a.group_ids, b.group_ids)
    assert not torch.equal(a.group_ids, draw(gen, 8, seed=3, step=6).group_ids)
    assert not torch.equal(a.group_ids, draw(gen, 8, seed=4, step=5).group_ids)
    other_rank = gen(8, context(3, 5, 1, torch.device("cpu")))
    assert not torch.equal(a.group_ids, other_rank.group_ids)


def test_indices_made_on_requested_device():
    gen = RandomGroupMasking(7, 0.3)
    m = draw(gen, 2)
    assert m.group_ids.device.type == "cpu" and m.group_ids.dtype == torch.int64
    if torch.cuda.is_available():  # pragma: no cover
        cuda = torch.device("cuda")
        assert gen(2, context(0, 0, 0, cuda)).group_ids.is_cuda


def test_registry_and_bad_ratio():
    assert "random_two_group" in MASK_GENERATORS
    assert isinstance(build_mask_generator(MaskConfig(ratio=0.4), 14), RandomGroupMasking)
    with pytest.raises(ConfigError, match="mask.name: unknown mask generator"):
        build_mask_generator(MaskConfig(name="blocky"), 14)
    with pytest.raises(ValueError, match="fewer than one per group"):
        RandomGroupMasking(2, 0.9)
