"""The data path at GPU speed (issue 17): uint8 batches normalised on the device, crop-aware
JPEG decoding, the same crops and interpolation on every path, device (nvJPEG) decoding."""
from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as tv1
from torchvision.transforms import InterpolationMode, v2

from scale.config import ConfigError, DataConfig, load_config
from scale.data import LoaderSpec
from scale.data.crop import CropParams, draw_crop, seeded_generator
from scale.data.device_input import DeviceInput
from scale.data.gpu_decode import DeviceJpeg, DeviceJpegItems, EncodedBatch, gpu_decode_problem, resolve_decode
from scale.data.transforms import PretrainTransform, dct_scale, draft_request, open_image
from test_webdataset_loader import build, write_shards

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CPU = torch.device("cpu")


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour blobs plus grain: resamples like a photograph, unlike white noise."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((3, 0.6), (10, 0.3)):
        coarse = rng.random((cells, cells, 3), dtype=np.float32)
        canvas += weight * np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height),
                                                                                           Image.BICUBIC), np.float32)
    canvas += rng.normal(0, 3, canvas.shape)
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def normalised_float_path(image: Image.Image, crop: CropParams, size: int) -> torch.Tensor:
    """The float path: float [0, 1] tensor, crop + bicubic antialiased resize in float, flip, normalise."""
    x = v2.functional.pil_to_tensor(image.convert("RGB")).float() / 255
    x = v2.functional.resized_crop(x, crop.top, crop.left, crop.height, crop.width, [size, size],
                                   interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = x.flip(-1) if crop.flip else x
    return v2.functional.normalize(x, list(MEAN), list(STD))


# ----------------------------------------------------------------------------- crops

def test_crops_are_torchvisions_random_resized_crop_and_flip_drawn_from_the_sample_seed():
    for seed in range(200):
        for width, height in ((341, 256), (500, 375), (28, 28), (3000, 90), (4, 400)):
            torch.manual_seed(seed)
            top, left, h, w = tv1.RandomResizedCrop.get_params(Image.new("RGB", (width, height)), [0.2, 1.0],
                                                               [3 / 4, 4 / 3])
            flip = torch.rand(1).item() < 0.5
            assert draw_crop(width, height, seeded_generator(seed), (0.2, 1.0)) == CropParams(top, left, h, w, flip)
    # a sample's crop depends on its seed and its original size alone, never on the global RNG
    torch.manual_seed(123)
    a = draw_crop(500, 375, seeded_generator(7), (0.2, 1.0))
    torch.manual_seed(456)
    assert draw_crop(500, 375, seeded_generator(7), (0.2, 1.0)) == a


# ----------------------------------------------------------------------------- uint8 on the device

def test_uint8_path_gives_the_float_paths_normalised_images_for_the_same_crop():
    image = photo(341, 256)
    transform = PretrainTransform(224, 3)
    to_model = DeviceInput(MEAN, STD)
    diffs = []
    for seed in range(12):
        crop = transform.params(341, 256, seed)
        pixels = transform.from_pil(image.copy(), crop)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224)
        ours = to_model(pixels[None], CPU)[0]
        reference = normalised_float_path(image, crop, 224)
        # The same bicubic kernel (PIL's, a = -0.5) in uint8 and in float. PIL rounds to uint8 between its
        # two passes and clamps the overshoot, the float path does neither: a few levels at most, < 1 on average.
        err = (ours - reference).abs() * torch.tensor(STD).view(3, 1, 1) * 255  # in levels of 255
        diffs.append(err.mean().item())
        assert err.max().item() < 4.5, f"seed {seed}: {err.max().item()}"
    assert max(diffs) < 0.6, diffs  # well under one level of 255 on average


def test_device_input_normalises_uint8_like_torchvision_and_passes_float_through():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    to_model = DeviceInput(MEAN, STD)
    expected = v2.functional.normalize(x.float() / 255, list(MEAN), list(STD))
    torch.testing.assert_close(to_model(x, CPU), expected, rtol=0, atol=2e-6)
    ready = torch.randn(2, 3, 8, 8)
    assert to_model(ready, CPU) is ready or torch.equal(to_model(ready, CPU), ready)


def test_workers_hand_over_uint8_batches_a_quarter_of_the_float_bytes(tmp_path: Path):
    write_shards(tmp_path, [8, 8])
    data = build(str(tmp_path), num_workers=2)
    images, _, _ = next(iter(data.loader(LoaderSpec(batch_size=4, seed=0, num_workers=2), 0)))
    assert images.dtype == torch.uint8
    assert images.numel() * images.element_size() == 4 * 3 * 16 * 16  # one byte per value, four times less than fp32
    prepared = data.prepare(images, CPU)
    assert prepared.dtype == torch.float32 and prepared.shape == images.shape


def test_the_trainer_normalises_on_the_device_inside_the_step(tmp_path: Path):
    from scale.trainer import Trainer

    cfg = load_config("ocl_cpu_tiny", [f"train.output_dir={tmp_path}", "train.micro_batch=8", "data.num_samples=64",
                                       "data.num_workers=0", "train.max_steps=1", "train.log_every=1"])
    trainer = Trainer(cfg)
    images, _, _ = next(iter(trainer.data.loader(trainer.loader_spec, 0)))
    assert images.dtype == torch.uint8
    seen: List[torch.Tensor] = []
    forward = trainer.engine.forward

    def spy(x, masks):
        seen.append(x)
        return forward(x, masks)
    trainer.engine.forward = spy
    metrics = trainer.train_step(images)
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], trainer.data.prepare(images, trainer.device))
    assert "time_input_s" in metrics


# ----------------------------------------------------------------------------- crop-aware decoding

def test_reduced_decode_covers_every_crop_at_the_output_size():
    for width, height in ((2048, 1536), (1000, 667), (500, 375), (341, 256), (4000, 300)):
        for seed in range(300):
            crop = draw_crop(width, height, seeded_generator(seed), (0.08, 1.0))
            request = draft_request(width, height, crop, 224)
            k = max(r for r in (8, 4, 2, 1) if r <= min(width // request[0], height // request[1]))  # PIL's choice
            decoded = (-(-width // k), -(-height // k))
            assert dct_scale(width, height, decoded) == k
            assert crop.width / k >= 224 - 1e-9 and crop.height / k >= 224 - 1e-9 or k == 1


def test_large_jpegs_decode_at_a_reduced_scale_and_match_the_full_decode():
    image = photo(1600, 1200, seed=3)
    data = jpeg(image)
    reduced, full = PretrainTransform(224, 3), PretrainTransform(224, 3, reduced_decode=False)
    scales, errors = set(), []
    for seed in range(8):
        crop = reduced.params(1600, 1200, seed)
        opened = open_image(io.BytesIO(data))
        a = reduced.from_pil(opened, crop).float()
        scales.add(dct_scale(1600, 1200, opened.size))  # what the transform decoded at
        b = full.from_pil(open_image(io.BytesIO(data)), crop).float()
        errors.append((a - b).abs().mean().item())
        assert (a - b).abs().mean().item() < 2.0, f"seed {seed}: mean abs diff {(a - b).abs().mean().item():.2f}"
    assert scales - {1}, f"no crop used a reduced DCT scale: {scales}"


def test_grayscale_models_decode_jpegs_straight_to_luma():
    data = jpeg(photo(300, 200))
    out = PretrainTransform(28, 1)(open_image(io.BytesIO(data)), seed=0)
    assert out.shape == (1, 28, 28) and out.dtype == torch.uint8


def test_tensor_sources_use_the_same_bicubic_kernel_as_pil():
    image = photo(120, 90)
    tensor = v2.functional.pil_to_tensor(image)
    transform = PretrainTransform(64, 3)
    for seed in range(6):
        crop = transform.params(120, 90, seed)
        a = transform.from_pil(image.copy(), crop).float()
        b = transform.from_tensor(tensor, crop).float()
        assert (a - b).abs().max().item() <= 3 and (a - b).abs().mean().item() < 0.5


# ----------------------------------------------------------------------------- device decoding

def test_encoded_batches_decode_to_the_cpu_paths_images(tmp_path: Path):
    """decode: gpu's worker half + EncodedBatch.decode, run on the CPU (torchvision's decoder): the
    same crops, the same size, pixels within a few levels; PNGs are cropped in the worker."""
    transform = PretrainTransform(64, 3)
    items = DeviceJpegItems(transform)
    jpegs = [jpeg(photo(200 + 10 * i, 150, seed=i)) for i in range(4)]
    png = io.BytesIO()
    photo(90, 90, seed=9).save(png, "PNG")
    samples = jpegs + [png.getvalue()]
    made = [items(s, seed) for seed, s in enumerate(samples)]
    assert isinstance(made[-1], torch.Tensor) and all(isinstance(m, DeviceJpeg) for m in made[:-1])
    batch = items.collate(made)
    assert len(batch) == 5 and batch.shape == (5, 3, 64, 64)
    decoded, replaced = batch.decode(CPU)
    assert replaced == 0
    for seed, s in enumerate(samples):
        cpu = transform(open_image(io.BytesIO(s)), seed).float()
        diff = (decoded[seed].float() - cpu).abs()
        assert diff.mean().item() < 1.5 and diff.max().item() <= 40, f"sample {seed}: {diff.mean()}, {diff.max()}"


def test_device_path_replaces_and_counts_a_corrupt_jpeg_like_the_cpu_path():
    """A JPEG whose header parses but whose body is cut: the worker cannot tell, the device (and PIL)
    reject it, so the next good JPEG of the batch stands in, cropped under the bad one's seed, counted."""
    transform = PretrainTransform(32, 3)
    items = DeviceJpegItems(transform)
    good = [jpeg(photo(80 + 8 * i, 60, seed=i)) for i in range(3)]
    cut = good[1][: len(good[1]) // 2]
    samples = [good[0], cut, good[2]]
    batch = items.collate([items(s, seed) for seed, s in enumerate(samples)])  # the header of `cut` parses
    to_model = DeviceInput(MEAN, STD)
    pixels = to_model.pixels(batch, CPU)
    assert to_model.replaced == 1
    stand_in = transform(open_image(io.BytesIO(good[2])), 1)  # next good sample, the bad one's seed (1)
    assert (pixels[1].float() - stand_in.float()).abs().mean().item() < 1.5
    assert (pixels[0].float() - transform(open_image(io.BytesIO(good[0])), 0).float()).abs().mean().item() < 1.5


def test_micro_batched_steps_normalise_one_micro_batch_at_a_time(tmp_path: Path):
    from scale.data.device_input import DeviceImages
    from scale.trainer import Trainer

    cfg = load_config("ocl_cpu_tiny", [f"train.output_dir={tmp_path}", "train.global_batch=8", "train.micro_batch=4",
                                       "data.num_samples=64", "data.num_workers=0", "train.max_steps=1"])
    trainer = Trainer(cfg)
    images, _, _ = next(iter(trainer.data.loader(trainer.loader_spec, 0)))
    seen = []
    passes = trainer.passes

    def spy(batch, masks, autocast):
        seen.append(batch)
        return passes(batch, masks, autocast)
    trainer.passes = spy
    trainer.train_step(images)
    (batch,) = seen
    assert isinstance(batch, DeviceImages) and batch.pixels.dtype == torch.uint8  # the float batch never exists whole
    whole = trainer.data.prepare(images, CPU)
    assert torch.equal(batch[0:4], whole[0:4]) and torch.equal(batch[4:8], whole[4:8])


def test_gpu_decode_falls_back_to_the_cpu_path_with_one_message_where_it_cannot_run(caplog):
    cfg = DataConfig(name="webdataset", root="x", decode="gpu")
    with caplog.at_level(logging.WARNING):
        resolved = resolve_decode(cfg, CPU)
    assert resolved.decode == "cpu"
    lines = [r.getMessage() for r in caplog.records if "data.decode=gpu" in r.getMessage()]
    assert len(lines) == 1 and "CPU" in lines[0] and "\n" not in lines[0]
    assert gpu_decode_problem(CPU) is not None
    assert resolve_decode(DataConfig(name="synthetic", decode="gpu"), CPU).decode == "cpu"
    assert resolve_decode(DataConfig(decode="cpu"), CPU).decode == "cpu"


def test_decode_setting_is_checked():
    with pytest.raises(ConfigError, match="data.decode must be cpu or gpu"):
        load_config("ocl_cpu_tiny", ["data.decode=nvjpeg"])


def test_device_decode_batches_resume_exactly_with_workers(tmp_path: Path):
    write_shards(tmp_path, [8, 8, 8, 8])
    data = build(str(tmp_path), decode="gpu", num_workers=2)
    spec = LoaderSpec(batch_size=4, seed=0, num_workers=2)
    whole = [(data.prepare(x, CPU), y) for x, y, _ in data.loader(spec, 1)]
    assert all(isinstance(x, EncodedBatch) for x, _, _ in data.loader(spec, 1, start_batch=5))
    resumed = [(data.prepare(x, CPU), y) for x, y, _ in data.loader(spec, 1, start_batch=3)]
    assert len(resumed) == len(whole) - 3
    for (a, la), (b, lb) in zip(whole[3:], resumed):
        assert torch.equal(la, lb) and torch.equal(a, b)


def test_cpu_batches_resume_exactly_with_workers(tmp_path: Path):
    write_shards(tmp_path, [8, 8, 8, 8])
    data = build(str(tmp_path), num_workers=2)
    spec = LoaderSpec(batch_size=4, seed=0, num_workers=2)
    whole = list(data.loader(spec, 2))
    resumed = list(data.loader(spec, 2, start_batch=3))
    for (a, la, _), (b, lb, _) in zip(whole[3:], resumed):
        assert torch.equal(la, lb) and torch.equal(a, b)
    # every path crops the same region: the device path's images match the CPU path's closely
    gpu_data = build(str(tmp_path), decode="gpu", num_workers=2)
    for (a, la, _), (b, lb, _) in zip(whole, gpu_data.loader(spec, 2)):
        assert torch.equal(la, lb)
        assert (a.float() - gpu_data.prepare(b, CPU).mul(torch.tensor(STD).view(1, 3, 1, 1))
                .add(torch.tensor(MEAN).view(1, 3, 1, 1)).mul(255)).abs().mean().item() < 6


def test_pinning_an_encoded_batch_keeps_its_contents():
    items = DeviceJpegItems(PretrainTransform(32, 3))
    batch = items.collate([items(jpeg(photo(64, 48)), 0)])
    if not torch.cuda.is_available():
        pytest.skip("pinning host memory needs CUDA")
    pinned = batch.pin_memory()
    assert pinned.data.is_pinned() and torch.equal(pinned.data, batch.data)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decoding needs a CUDA device")
def test_nvjpeg_decode_matches_the_cpu_path_on_cuda():
    device = torch.device("cuda")
    assert gpu_decode_problem(device) is None
    transform = PretrainTransform(224, 3)
    items = DeviceJpegItems(transform)
    samples = [jpeg(photo(500, 375, seed=i)) for i in range(8)]
    batch = items.collate([items(s, seed) for seed, s in enumerate(samples)]).pin_memory()
    decoded = batch.decode(device)[0].cpu()
    for seed, s in enumerate(samples):
        cpu = transform(open_image(io.BytesIO(s)), seed).float()
        assert (decoded[seed].float() - cpu).abs().mean().item() < 2.0
    assert math.isfinite(DeviceInput(MEAN, STD)(batch, device).sum().item())
