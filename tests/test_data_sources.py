import numpy as np
import pytest
import torch
from PIL import Image

from scale.config import DataConfig
from scale.data import DATASETS, LoaderSpec, build_dataset
from scale.data.synthetic import SyntheticImages
from scale.errors import UserError


def collect(data, spec, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y, _ in data.loader(spec, epoch, start)]


def test_synthetic_is_deterministic_and_class_structured():
    a = SyntheticImages(64, 4, 28, 1)
    b = SyntheticImages(64, 4, 28, 1)
    for i in (0, 5, 63):
        torch.testing.assert_close(a[i][0], b[i][0])
        assert a[i][1] == i % 4
    # Same-class images are closer than different-class ones in a shift-invariant view
    # (Fourier magnitudes: samples are randomly shifted copies of their class pattern).
    imgs = torch.stack([torch.fft.fft2(a[i][0]).abs().flatten() for i in range(64)])
    labels = torch.tensor([a[i][1] for i in range(64)])
    imgs = torch.nn.functional.normalize(imgs - imgs.mean(0), dim=1)
    sim = imgs @ imgs.T
    same = (labels[:, None] == labels[None]) & ~torch.eye(64, dtype=torch.bool)
    diff = labels[:, None] != labels[None]
    assert sim[same].mean() > sim[diff].mean() + 0.2


def test_held_out_split_shares_classes_not_samples():
    cfg = DataConfig(num_samples=100, num_classes=5, mean=(0.5,), std=(0.25,))
    train = build_dataset(cfg, 28, 1, train=True)
    val = build_dataset(cfg, 28, 1, train=False)
    assert train.num_samples == 100 and val.num_samples == 20
    assert not torch.equal(train.source[0][0], val.source[0][0])


def test_map_style_order_is_resumable_and_split_by_rank():
    cfg = DataConfig(num_samples=96, num_classes=4, mean=(0.5,), std=(0.25,))
    data = build_dataset(cfg, 28, 1)
    spec = LoaderSpec(batch_size=8, seed=3)
    full = collect(data, spec, epoch=1)
    assert len(full) == data.batches_per_epoch(spec) == 12
    resumed = collect(data, spec, epoch=1, start=5)
    assert len(resumed) == 7
    for (x, y), (rx, ry) in zip(full[5:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    other_epoch = collect(data, spec, epoch=2)
    assert not torch.equal(full[0][0], other_epoch[0][0])
    # worker count does not change the batches (per-sample augmentation seeds)
    workers = collect(data, LoaderSpec(batch_size=8, seed=3, num_workers=2), epoch=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, workers))
    # two ranks: disjoint halves of the same permutation, equal batch counts
    r0 = LoaderSpec(batch_size=8, seed=3, rank=0, world_size=2)
    r1 = LoaderSpec(batch_size=8, seed=3, rank=1, world_size=2)
    i0, i1 = data.rank_indices(r0, 1), data.rank_indices(r1, 1)
    assert not set(i0) & set(i1) and len(i0) == len(i1) == 48
    assert data.batches_per_epoch(r0) == data.batches_per_epoch(r1) == 6


def test_mae_transform_is_seeded_per_sample_and_none_is_plain():
    cfg = DataConfig(num_samples=16, num_classes=2, mean=(0.5,), std=(0.25,))
    data = build_dataset(cfg, 28, 1)
    spec = LoaderSpec(batch_size=4, seed=0)
    x1 = collect(data, spec, 0)[0][0]
    x2 = collect(data, spec, 0)[0][0]
    assert torch.equal(x1, x2)
    plain = build_dataset(DataConfig(num_samples=16, num_classes=2, mean=(0.5,), std=(0.25,), transform="none"),
                          28, 1)
    idx = plain.rank_indices(spec, 0)[0]
    batch = collect(plain, spec, 0)[0][0]
    assert batch.dtype == torch.uint8  # the workers hand over pixels; prepare normalises
    expected = (plain.source[idx][0].mul(255).round() / 255 - 0.5) / 0.25
    torch.testing.assert_close(plain.prepare(batch, torch.device("cpu"))[0], expected)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = build_dataset(DataConfig(name="image_folder", root=str(tmp_path)), 32, 3)
    assert data.num_samples == 10
    batches = collect(data, LoaderSpec(batch_size=5, seed=0), 0)
    assert len(batches) == 2 and batches[0][0].shape == (5, 3, 32, 32)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == [0] * 5 + [1] * 5


def test_image_folder_errors_name_the_root(tmp_path):
    with pytest.raises(UserError, match="data.root"):
        build_dataset(DataConfig(name="image_folder", root=str(tmp_path / "nope")), 32, 3)
    with pytest.raises(UserError, match="data.mean"):
        build_dataset(DataConfig(name="synthetic"), 28, 1)  # 3-value ImageNet mean for 1 channel
    with pytest.raises((KeyError, UserError), match="synthetic"):  # the registry lists what is registered
        build_dataset(DataConfig(name="lmdb"), 28, 1)
    assert "image_folder" in DATASETS
