"""`python -m scale.mask_pictures --checkpoint CKPT` (also `scale-mask-pictures`): one PNG of the masks
Evolved Hierarchical Masking draws for a few images, next to their random counterparts.

One row per image: the image; its patch tree cut at several depths d = max(1, floor(f x H)) (H: that
image's tree height), each part of two or more patches in its own colour, single patches left plain;
MAE's random mask (`random`) next to EHM's (`ehm`) at --ratio, masked patches grey; OCL's two groups
drawn at random (`random_two_group`) next to EHM's (`ehm_two_group`) at --ocl-ratio, group A orange,
group B blue, dropped patches grey.

The tree and the EHM masks come from the checkpoint's own attention, with the run's `mask.ehm`
settings (blocks, tree, max_depth, signal source) and the depth rule `evolved` at training progress
--progress. CKPT is a checkpoint directory or a run directory (its newest checkpoint); --random-init
--recipe NAME draws from a freshly initialised model instead. Images: the first --images of the
held-out split (`data.val_root`, else `data.root`; --data overrides) in loader order, or --indices.
Every draw starts from a generator seeded by --seed: the same command writes the same PNG.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import ConfigError, RunConfig, load_config
from .errors import CommandParser, UserError, run_command
from .masking import EHMMaskConfig, MaskContext, MaskGenerator, Masks, build_mask_generator
from .pretraining import PretrainModule, build_pretrain_module

MASKED_GREY = np.array([0.5, 0.5, 0.5])  # masked / dropped patches, flat: apart from black and white backgrounds
GROUP_TINTS = (np.array([1.0, 0.55, 0.1]), np.array([0.15, 0.45, 1.0]))  # OCL's group A, group B
TINT = 0.5  # share of the tint in a group's patches
PART_TINT = 0.65  # share of the part colour in a cut's coloured patches
PANEL_INCHES = 1.6
HEADER_INCHES = 0.6  # the figure's title lines
DPI = 100  # PANEL_INCHES x DPI and HEADER_INCHES x DPI are whole pixels: the PNG's size is exact
MAX_IMAGES = 32


@dataclass
class Panel:
    title: str
    pixels: np.ndarray  # (H, W, 3) float in [0, 1]


# ----------------------------------------------------------------------------- pure pictures

def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, C, H, W) normalised images -> (B, H, W, 3) RGB in [0, 1] (grey images repeated)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    rgb = (images.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    if rgb.shape[1] == 1:
        rgb = rgb.expand(-1, 3, -1, -1)
    return rgb[:, :3].permute(0, 2, 3, 1).numpy()


def patch_labels(masks: Masks, num_patches: int) -> torch.Tensor:
    """(B, N) long: the group index of each patch, -1 where no group sees it (masked / dropped)."""
    batch, groups, per_group = masks.group_ids.shape
    labels = torch.full((batch, num_patches), -1, dtype=torch.long)
    group_of = torch.arange(groups).view(1, groups, 1).expand(batch, groups, per_group)
    labels.scatter_(1, masks.group_ids.cpu().reshape(batch, -1), group_of.reshape(batch, -1))
    return labels


def _patch_grid(values: np.ndarray, grid_size: int, image: np.ndarray) -> np.ndarray:
    """(N, ...) per-patch values -> the image's pixel grid (patches are image_size / grid_size wide)."""
    patch = image.shape[0] // grid_size
    grid = values.reshape(grid_size, grid_size, *values.shape[1:])
    return grid.repeat(patch, axis=0).repeat(patch, axis=1)


def part_colour_index(parts: np.ndarray, grid_size: int, num_colours: int) -> Dict[int, int]:
    """Part label -> palette index for every part of two or more patches. Greedy map colouring in label
    order: parts that touch (4-neighbours) never share a colour while the palette has enough colours."""
    grid = parts.reshape(grid_size, grid_size)
    labels, counts = np.unique(parts, return_counts=True)
    coloured = {int(label) for label, count in zip(labels, counts) if count > 1}
    touching: Dict[int, set] = {label: set() for label in coloured}
    for a, b in ((grid[:, :-1], grid[:, 1:]), (grid[:-1, :], grid[1:, :])):
        for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
            if x != y and x in coloured and y in coloured:
                touching[x].add(y)
                touching[y].add(x)
    colour: Dict[int, int] = {}
    for label in sorted(coloured):
        used = {colour[n] for n in touching[label] if n in colour}
        colour[label] = next((c for c in range(num_colours) if c not in used), len(colour) % num_colours)
    return colour


def part_colours(image: np.ndarray, parts: torch.Tensor | np.ndarray, grid_size: int,
                 palette: Optional[Sequence[Sequence[float]]] = None) -> np.ndarray:
    """(H, W, 3) image with each part (of a tree cut, (N,) labels) of two or more patches tinted by its
    colour; single patches stay as they are, so the parts that merged stand out as regions."""
    if palette is None:
        import matplotlib

        palette = matplotlib.colormaps["tab10"].colors  # distinct hues first: touching parts get 0..3
    parts = np.asarray(parts).reshape(-1)
    index = part_colour_index(parts, grid_size, len(palette))
    rgb = np.array([palette[index[int(p)]] if int(p) in index else (0.0, 0.0, 0.0) for p in parts], dtype=np.float64)
    share = np.array([PART_TINT if int(p) in index else 0.0 for p in parts])
    rgb, share = _patch_grid(rgb, grid_size, image), _patch_grid(share, grid_size, image)[..., None]
    return (1 - share) * image + share * rgb


def mask_overlay(image: np.ndarray, labels: torch.Tensor | np.ndarray, grid_size: int,
                 tints: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
    """(H, W, 3) image with a mask drawn over it ((N,) labels of `patch_labels`): patches no group sees
    greyed, each group's patches tinted by `tints[group]` (or left as they are when `tints` is None)."""
    labels = np.asarray(labels).reshape(-1)
    fill = np.tile(MASKED_GREY, (labels.size, 1))
    share = np.where(labels < 0, 1.0, 0.0)
    if tints is not None:
        for group, tint in enumerate(tints):
            fill[labels == group] = tint
            share[labels == group] = TINT
    fill, share = _patch_grid(fill, grid_size, image), _patch_grid(share, grid_size, image)[..., None]
    return (1 - share) * image + share * fill


# ----------------------------------------------------------------------------- the model's masks

def mask_context(images: torch.Tensor, module: PretrainModule, generator: MaskGenerator,
                 progress: float, seed: int) -> MaskContext:
    """A fresh context for one draw: each generator starts from the same seed, as at one training step."""
    request = generator.needs.model_signal
    if request is not None and request.ema_decay is not None and module.signal_ema is None:
        request = dataclasses.replace(request, ema_decay=None)  # a run that never kept the EMA copy
    rng = torch.Generator(device=images.device)
    rng.manual_seed(seed)
    signal = None if request is None else (lambda chunk: module.model_signal(chunk, request))
    return MaskContext(generator=rng, device=images.device, progress=progress, epoch_progress=progress,
                       images=images, model_signal=signal)


def _generator(cfg: RunConfig, name: str, ratio: float, flag: str, grid_size: int) -> MaskGenerator:
    section = dataclasses.replace(cfg.mask.switched(name), ratio=ratio)  # the run's EHM settings where it has them
    if isinstance(section, EHMMaskConfig):
        section.ehm = dataclasses.replace(section.ehm, depth="evolved")  # --progress sets the depth, as in training
    try:
        return build_mask_generator(section, grid_size)
    except ConfigError as err:
        raise UserError(f"{flag} {ratio}: {err}") from None


@torch.no_grad()
def picture_rows(module: PretrainModule, cfg: RunConfig, images: torch.Tensor, indices: Sequence[int],
                 depths: Sequence[float], ratio: float, ocl_ratio: float, progress: float,
                 seed: int) -> List[List[Panel]]:
    """The panels of each image's row: image, tree cuts, MAE random | EHM, OCL random | EHM."""
    grid = module.encoder.spec.grid_size
    n = grid * grid
    gens = {name: _generator(cfg, name, r, flag, grid) for name, r, flag in (
        ("random", ratio, "--ratio"), ("ehm", ratio, "--ratio"),
        ("random_two_group", ocl_ratio, "--ocl-ratio"), ("ehm_two_group", ocl_ratio, "--ocl-ratio"))}
    ehm, ehm_two = gens["ehm"], gens["ehm_two_group"]
    context = mask_context(images, module, ehm, progress, seed)
    tree = ehm.build_tree(ehm.similarity(context))  # the tree both EHM generators cut
    height = tree.height
    depth_of = [torch.floor(height.double() * f).clamp(min=1).long() for f in depths]  # d = max(1, floor(f H))
    cuts = [(depth.cpu(), tree.cut(depth).cpu()) for depth in depth_of]
    labels = {name: patch_labels(gen(images.shape[0], mask_context(images, module, gen, progress, seed)), n)
              for name, gen in gens.items()}
    ehm_depth = ehm.depth(height, context)
    ocl_depth = ehm_two.depth(height, context)
    pixels = denormalize(images, cfg.data.mean, cfg.data.std)
    rows = []
    for i, (index, image) in enumerate(zip(indices, pixels)):
        h = int(height[i])
        row = [Panel(f"image {index}", image)]
        row += [Panel(f"d = {int(depth[i])} / {h}", part_colours(image, parts[i], grid)) for depth, parts in cuts]
        row += [Panel("MAE random", mask_overlay(image, labels["random"][i], grid)),
                Panel(f"EHM d = {int(ehm_depth[i])} / {h}", mask_overlay(image, labels["ehm"][i], grid)),
                Panel("OCL random", mask_overlay(image, labels["random_two_group"][i], grid, GROUP_TINTS)),
                Panel(f"OCL EHM d = {int(ocl_depth[i])} / {h}", mask_overlay(image, labels["ehm_two_group"][i],
                                                                            grid, GROUP_TINTS))]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- figure

def figure_inches(rows: int, cols: int) -> Tuple[float, float]:
    """(width, height) of the figure: the PNG is this x DPI pixels."""
    return cols * PANEL_INCHES, rows * PANEL_INCHES + HEADER_INCHES


def save_figure(rows: List[List[Panel]], header: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    cols = max(len(row) for row in rows)
    width, height = figure_inches(len(rows), cols)
    figure, axes = plt.subplots(len(rows), cols, figsize=(width, height), squeeze=False)
    for row, row_axes in zip(rows, axes):
        for panel, ax in zip(row, row_axes):
            ax.imshow(panel.pixels, interpolation="nearest")
            ax.set_title(panel.title, fontsize=7, pad=2)
        for ax in row_axes:
            ax.axis("off")
    figure.suptitle(header, fontsize=8, y=1 - 0.08 / height)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - HEADER_INCHES / height,
                           wspace=0.08, hspace=0.25)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=DPI)
    except OSError as err:
        raise UserError(f"--out {out}: cannot be written ({err.strerror or err})") from None
    finally:
        plt.close(figure)
    return out


# ----------------------------------------------------------------------------- command

def load_model(args: argparse.Namespace) -> Tuple[PretrainModule, RunConfig, str]:
    """(module with the checkpoint's weights, or freshly initialised; its run config; a source label)."""
    if args.random_init:
        cfg = load_config(args.recipe)
        torch.manual_seed(cfg.train.seed)  # the run's own initialisation, as its step 0
        return build_pretrain_module(cfg), cfg, f"{cfg.model.name} at random init (recipe {args.recipe})"
    from .checkpoint_io import CheckpointFormatError, load_checkpoint

    loaded = load_checkpoint(args.checkpoint)
    if loaded.config is None and not args.recipe:
        raise UserError(f"--checkpoint {loaded.path}: carries no saved run config; pass --recipe NAME")
    cfg = load_config(args.recipe) if loaded.config is None else load_config(None, base=loaded.config)
    module = build_pretrain_module(cfg)
    try:
        module.load_state_dict(loaded.model_state, strict=True)
    except RuntimeError as err:
        raise CheckpointFormatError(f"--checkpoint {loaded.path}: weights do not fit {cfg.model.name} "
                                    f"({str(err).splitlines()[0]})") from None
    step = loaded.meta.get("step", "?")
    return module, cfg, f"{loaded.path} (step {step}, {cfg.objective.name} + {cfg.mask.name})"


def load_images(cfg: RunConfig, module: PretrainModule, data: Optional[str], indices: Sequence[int]) -> torch.Tensor:
    """The images at `indices` of the held-out split, in loader order (seed 0, no shuffle buffer)."""
    from .eval.features import build_split, iterate_split

    if data and cfg.data.name == "synthetic":
        raise UserError(f"--data {data}: the run's data.name is synthetic, which reads no files")
    root = data or cfg.data.val_root or cfg.data.root
    try:
        split = build_split(dataclasses.replace(cfg.data, val_root=root, shuffle_buffer=0, num_workers=0),
                            module.encoder.spec, train=False)
    except UserError as err:
        if not data:
            raise
        raise UserError(f"--data {data}: {err}") from None
    wanted = max(indices) + 1
    batches, seen = [], 0
    for images, _ in iterate_split(split, batch_size=min(wanted, 64)):
        batches.append(images)
        seen += images.shape[0]
        if seen >= wanted:
            break
    if seen < wanted:
        raise UserError(f"--indices {max(indices)}: the split {root or cfg.data.name} holds only {seen} images")
    return torch.cat(batches)[list(indices)]


def check_args(args: argparse.Namespace) -> None:
    if args.random_init and not args.recipe:
        raise UserError("--random-init needs --recipe NAME (the model and data to draw from)")
    if not args.random_init and not args.checkpoint:
        raise UserError("give --checkpoint CKPT (a checkpoint or run directory), or --random-init --recipe NAME")
    if args.indices is None and not 1 <= args.images <= MAX_IMAGES:
        raise UserError(f"--images must be in [1, {MAX_IMAGES}], got {args.images}")
    if args.indices is not None and (not args.indices or len(args.indices) > MAX_IMAGES or min(args.indices) < 0):
        raise UserError(f"--indices takes 1 to {MAX_IMAGES} image indices >= 0, got {args.indices}")
    if not args.depths or any(not 0 < f <= 1 for f in args.depths):
        raise UserError(f"--depths takes fractions of the tree height in (0, 1], got {args.depths}")
    for flag, value in (("--ratio", args.ratio), ("--ocl-ratio", args.ocl_ratio)):
        if not 0 <= value < 1:
            raise UserError(f"{flag} must be in [0, 1), got {value}")
    if not 0 <= args.progress <= 1:
        raise UserError(f"--progress must be in [0, 1], got {args.progress}")
    if Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: is a directory; give the PNG to write, "
                        f"e.g. {Path(args.out) / 'ehm_masks.png'}")


def _pictures(args: argparse.Namespace) -> int:
    from .device import resolve_device

    check_args(args)
    device = resolve_device(args.device, "--device")
    module, cfg, source = load_model(args)
    module.to(device)
    indices = args.indices if args.indices is not None else list(range(args.images))
    images = load_images(cfg, module, args.data, indices).to(device)
    rows = picture_rows(module, cfg, images, indices, args.depths, args.ratio, args.ocl_ratio, args.progress,
                        args.seed)
    header = (f"{source}\nprogress {args.progress:g}, mask ratio {args.ratio:g}, OCL drop ratio "
              f"{args.ocl_ratio:g}, seed {args.seed}; grey: masked / dropped; OCL group A orange, B blue; "
              "cuts: parts of 2+ patches coloured")
    print(save_figure(rows, header, Path(args.out)))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = CommandParser(prog="scale-mask-pictures", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint", help="checkpoint dir (step_XXXXXXXX), or a run dir (its newest)")
    parser.add_argument("--random-init", action="store_true", help="no checkpoint: the --recipe model at init")
    parser.add_argument("--recipe", help="recipe name or YAML path: the model and data of --random-init "
                                         "(or of a checkpoint without a saved config)")
    parser.add_argument("--data", help="held-out images to draw (default: the run's data.val_root, else data.root)")
    parser.add_argument("--images", type=int, default=4, help=f"the first K images of the split (1..{MAX_IMAGES})")
    parser.add_argument("--indices", type=int, nargs="+", help="these images of the split instead")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8],
                        help="tree cuts to show, as fractions of each image's tree height")
    parser.add_argument("--ratio", type=float, default=0.75, help="mask ratio of MAE random and EHM")
    parser.add_argument("--ocl-ratio", type=float, default=0.3, help="drop ratio of OCL's two groups")
    parser.add_argument("--progress", type=float, default=0.5, help="training progress in [0, 1]: EHM's depth")
    parser.add_argument("--seed", type=int, default=0, help="seed of every mask draw")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--out", default="ehm_masks.png", help="the PNG to write")
    args = parser.parse_args(argv)
    return run_command("scale-mask-pictures", lambda: _pictures(args))


if __name__ == "__main__":
    sys.exit(main())
