"""Export a pre-training checkpoint's encoder as a timm VisionTransformer (safetensors).

    python -m scale.export --checkpoint runs/x/checkpoints/step_00001000 --out vit.safetensors
    python -m scale.export --checkpoint runs/x --hub-dir vit-ocl   # a folder for the HF hub and timm

The encoder's parameter names are timm's, so the export is the `encoder.*` entries of the
PretrainModule state dict with the prefix stripped: nothing is added or renamed. The
safetensors metadata holds the `timm.create_model` arguments that rebuild the architecture
(`timm_model_from_export` does it). Checkpoints of every engine are read by
scale.checkpoint_io (`load_checkpoint`, the format detected by the files present); its
readers are re-exported here, so existing imports from scale.export keep working.

`--hub-dir` writes the same weights as timm's `save_for_hf` does (config.json, model.safetensors)
plus a README.md model card with the run's method, data, length and evaluation results, so
`timm.create_model("local-dir:DIR", pretrained=True)` loads it and the folder can be uploaded as is.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .checkpoint_io import (CheckpointFormatError, LoadedCheckpoint, detect_format,  # noqa: F401  (re-exported)
                            encoder_state_dict, load_checkpoint, resolve_checkpoint)
from .errors import CommandParser, UserError, run_command
from .models.vit import ViTSpec, model_spec

# timm architecture whose defaults match an embedding width, for presets without a timm twin.
TIMM_NAME_BY_WIDTH = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
                      1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224"}


# ----------------------------------------------------------------------------- architecture

def spec_from_config(config: Optional[Dict[str, Any]], fallback_model: str = "") -> ViTSpec:
    """The encoder's shapes from a saved run config's `model` section (preset + size overrides)."""
    model = (config or {}).get("model") or {}
    name = model.get("name") or fallback_model
    if not name:
        raise CheckpointFormatError("the checkpoint carries no run config naming its model; pass --config")
    return model_spec(name, model.get("img_size"), model.get("in_chans"))


def timm_kwargs(spec: ViTSpec) -> Dict[str, Any]:
    """`timm.create_model` arguments for the architecture of `spec` (no classifier)."""
    return {
        "model_name": spec.timm_name or TIMM_NAME_BY_WIDTH.get(spec.embed_dim, "vit_base_patch16_224"),
        "num_classes": 0, "global_pool": "token", "img_size": spec.img_size, "patch_size": spec.patch_size,
        "in_chans": spec.in_chans, "embed_dim": spec.embed_dim, "depth": spec.depth, "num_heads": spec.num_heads,
        "mlp_ratio": spec.mlp_ratio,
    }


def _integer_from(low: int) -> Callable[[Any], bool]:
    return lambda value: type(value) is int and value >= low  # bool is an int subclass: not allowed


def _positive_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0


def _vit_architecture(value: Any) -> bool:
    from timm.models import is_model_in_modules

    return isinstance(value, str) and is_model_in_modules(value, ["vision_transformer"])


# The `timm.create_model` arguments an export may carry: timm_kwargs' architecture keys (a fine-tuned
# classifier's num_classes and global_pool included), each with what its value may be. An export is an
# untrusted file, and create_model also takes arguments that read or fetch other files (checkpoint_path,
# pretrained, pretrained_cfg_overlay, an "hf-hub:" model name): nothing but these keys ever reaches it.
EXPORT_KWARGS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "model_name": (_vit_architecture, "a timm VisionTransformer architecture such as vit_base_patch16_224"),
    "num_classes": (_integer_from(0), "an integer >= 0"),
    "global_pool": (lambda value: value in ("token", "avg"), "token or avg"),
    **{key: (_integer_from(1), "an integer >= 1")
       for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")},
    "mlp_ratio": (_positive_number, "a finite number > 0"),
}


def check_export_kwargs(path: str | Path, kwargs: Any) -> Dict[str, Any]:
    """`kwargs`, the decoded timm_kwargs of export `path`, if it names a model and holds only
    EXPORT_KWARGS keys with allowed values; a CheckpointFormatError naming the key otherwise."""
    if not isinstance(kwargs, dict) or "model_name" not in kwargs:
        raise CheckpointFormatError(f"{path}: timm_kwargs must be a JSON object with a model_name")
    for key, value in kwargs.items():
        if key not in EXPORT_KWARGS:
            raise CheckpointFormatError(f"{path}: timm_kwargs key {key[:60]!r} is not allowed; allowed: "
                                        + ", ".join(EXPORT_KWARGS))
        allowed, what = EXPORT_KWARGS[key]
        if not allowed(value):
            raise CheckpointFormatError(f"{path}: timm_kwargs {key} must be {what}, got {str(value)[:60]!r}")
    return kwargs


def create_timm_model(kwargs: Dict[str, Any], **overrides: Any) -> torch.nn.Module:
    import timm

    args = {**kwargs, **overrides}
    name = args.pop("model_name")
    return timm.create_model(name, pretrained=False, **args)


# ----------------------------------------------------------------------------- export

def read_encoder(checkpoint: str | Path, fallback_model: str = "") -> Tuple[LoadedCheckpoint, Dict[str, torch.Tensor],
                                                                           Dict[str, Any]]:
    """(checkpoint, encoder state dict in timm's names as fp32, timm kwargs) of `checkpoint`."""
    loaded = load_checkpoint(checkpoint)
    state = encoder_state_dict(loaded.model_state, str(loaded.path))
    spec = spec_from_config(loaded.config, fallback_model or loaded.meta.get("model", ""))
    # safetensors wants contiguous, unshared tensors; fp32 keeps exports engine-independent.
    tensors = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
               for k, v in state.items()}
    return loaded, tensors, timm_kwargs(spec)


def export_encoder(checkpoint: str | Path, out: str | Path, fallback_model: str = "") -> Dict[str, Any]:
    """Write the encoder of `checkpoint` to `out` (safetensors); return the metadata written."""
    from safetensors.torch import save_file

    loaded, tensors, kwargs = read_encoder(checkpoint, fallback_model)
    metadata = {
        "format": "pt",
        "timm_model": kwargs["model_name"],
        "timm_kwargs": json.dumps(kwargs),
        "scale_model": ((loaded.config or {}).get("model") or {}).get("name", "") or loaded.meta.get("model", ""),
        "source_checkpoint": str(loaded.path),
        "source_format": loaded.format,
        "step": str(loaded.meta.get("step", "")),
    }
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create its folder ({err.strerror or err})") from None
    # Written beside the target and renamed: an existing export is replaced only by a complete one.
    partial = out.with_name(out.name + ".partial")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, out)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise UserError(f"--out {out}: cannot write it ({err.strerror or err})") from None
    return metadata


def read_export(path: str | Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, timm kwargs) of an export; the kwargs checked against EXPORT_KWARGS."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "timm_kwargs" not in metadata:
        raise CheckpointFormatError(f"{path}: no timm_kwargs in the safetensors metadata (not a scale export)")
    try:
        kwargs = json.loads(metadata["timm_kwargs"])
    except ValueError as err:
        raise CheckpointFormatError(f"{path}: timm_kwargs in the safetensors metadata is not JSON ({err})") from None
    return load_file(str(path)), check_export_kwargs(path, kwargs)


def timm_model_from_export(path: str | Path, **overrides: Any) -> torch.nn.Module:
    """Rebuild the timm model of an export and load its weights (strict)."""
    state, kwargs = read_export(path)
    model = create_timm_model(kwargs, **overrides)
    missing, unexpected = model.load_state_dict(state, strict=not overrides.get("num_classes"))
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        raise CheckpointFormatError(f"{path}: weights do not fit {kwargs['model_name']}: missing {missing}, "
                           f"unexpected {unexpected}")
    return model


# ----------------------------------------------------------------------------- hub folder

HUB_TASK = "image-feature-extraction"  # an encoder without a classifier: its output is the CLS embedding
EVAL_KINDS = {"knn": "kNN (`scale-eval knn`)", "linprobe": "linear probe (`scale-eval linprobe`)"}


def check_hub_dir(path: Path) -> None:
    """UserError unless `path` can become a new export folder: absent, or an empty folder, below a
    writable one. Checked before the checkpoint is read; a previous export is never overwritten."""
    from .eval.results import check_writable_ancestor

    if path.is_symlink():
        raise UserError(f"--hub-dir {path}: is a symbolic link; give a new or empty folder")
    if path.exists() and not path.is_dir():
        raise UserError(f"--hub-dir {path}: is a file; give a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"--hub-dir {path}: is not empty (a previous export is never overwritten); "
                        "give a new or empty folder")
    check_writable_ancestor(path, "--hub-dir")


def export_hub_dir(checkpoint: str | Path, hub_dir: str | Path, fallback_model: str = "") -> Dict[str, Any]:
    """Write the encoder of `checkpoint` to the new folder `hub_dir` as the Hugging Face hub and timm
    expect it: timm's own `save_for_hf` writes config.json (architecture, model_args, preprocessing)
    and model.safetensors; README.md is a model card (generate_readme) with the run's results.
    `timm.create_model("local-dir:DIR", pretrained=True)` loads it, as does "hf-hub:ID" once uploaded.
    The folder is written beside `hub_dir` and renamed to it when complete. Returns the card's facts."""
    from timm.models import save_for_hf

    hub_dir = Path(hub_dir)
    check_hub_dir(hub_dir)
    loaded, tensors, kwargs = read_encoder(checkpoint, fallback_model)
    model = create_timm_model(kwargs)
    model.load_state_dict(tensors, strict=True)
    facts = card_facts(loaded, kwargs, sum(t.numel() for t in tensors.values()))
    # Preprocessing as the run's evaluation sees images: the whole image resized (no crop), its normalisation.
    data_config = {"interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "squash",
                   **run_normalisation(loaded, kwargs["in_chans"])}
    # Otherwise timm keeps the untrained architecture's tag (augreg_in21k_ft_in1k) and license: not these weights'.
    model_config = {"pretrained_cfg": {"tag": f"scale_{facts['objective']}", "license": "other"}}
    try:
        hub_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = hub_dir.with_name(f".{hub_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        staging.mkdir()
    except OSError as err:
        raise UserError(f"--hub-dir {hub_dir}: cannot create it ({err.strerror or err})") from None
    try:
        save_for_hf(model, str(staging), model_config=model_config, safe_serialization=True, data_config=data_config)
        (staging / "README.md").write_text(model_card(facts, hub_dir.name), encoding="utf-8")
        # safetensors writes its file owner-only; weights meant for sharing get the mode the umask gives config.json.
        os.chmod(staging / "model.safetensors", (staging / "config.json").stat().st_mode & 0o777)
        os.rename(staging, hub_dir)  # replaces only an empty folder: one filled meanwhile fails the rename
    except OSError as err:
        raise UserError(f"--hub-dir {hub_dir}: cannot write it ({err.strerror or err})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return facts


def run_section(loaded: LoadedCheckpoint, name: str) -> Dict[str, Any]:
    """Section `name` of the checkpoint's saved run config; empty where it has none."""
    value = (loaded.config or {}).get(name)
    return value if isinstance(value, dict) else {}


def run_normalisation(loaded: LoadedCheckpoint, in_chans: int) -> Dict[str, Tuple[float, ...]]:
    """data.mean and data.std of the run (those it has), each one number or one per channel."""
    out = {}
    for key in ("mean", "std"):
        value = run_section(loaded, "data").get(key)
        if value is None:
            continue
        if (not isinstance(value, (list, tuple)) or len(value) not in (1, in_chans)
                or not all(type(v) in (int, float) and math.isfinite(v) for v in value)):
            raise CheckpointFormatError(f"checkpoint {str(loaded.path)!r}: its run config's data.{key} must be one "
                                        f"number or one per input channel ({in_chans}), got {str(value)[:60]}")
        out[key] = tuple(value)
    return out


def card_facts(loaded: LoadedCheckpoint, kwargs: Dict[str, Any], num_params: int) -> Dict[str, Any]:
    """What the model card says about a checkpoint: its run config's method, model, data and length,
    the step it was saved at, and the evaluation results the run holds for that step."""
    step = loaded.meta.get("step")
    data = run_section(loaded, "data")
    return {
        "objective": str(run_section(loaded, "objective").get("name") or "unknown"),
        "mask": str(run_section(loaded, "mask").get("name") or "unknown"),
        "scale_model": str(run_section(loaded, "model").get("name") or loaded.meta.get("model") or "unknown"),
        "timm_kwargs": kwargs,
        "num_params": num_params,
        "data": f"{data.get('name', 'unknown')}" + (f" ({data['root']})" if data.get("root") else ""),
        "step": step,
        "epoch": loaded.meta.get("epoch"),
        "epochs": run_section(loaded, "train").get("epochs"),
        "engine": loaded.meta.get("engine"),
        "checkpoint": str(loaded.path),
        "results": run_results(loaded.path, step),
        "config": json.loads(json.dumps(loaded.config or {})),  # tuples as lists: what yaml.safe_dump can write
    }


def run_results(checkpoint: Path, step: Any) -> List[Dict[str, Any]]:
    """The run's results for `checkpoint`: scale.eval's knn / linprobe files beside it, and the kNN
    record the trainer's monitor logged at its step in metrics.jsonl. Empty when it has none."""
    from .eval.results import read_results
    from .plot import METRICS_FILE, read_run

    rows = []
    for kind, name in EVAL_KINDS.items():
        results = read_results(checkpoint, kind)
        if results is not None:
            protocol = (f"k={results.get('k')}, T={results.get('temperature')}, {results.get('bank')} bank / "
                        f"{results.get('queries')} query images" if kind == "knn"
                        else f"{results.get('steps')} head steps")
            rows.append({"evaluation": name, "top1": results["top1"], "top5": results.get("top5"),
                         "protocol": protocol})
    metrics = checkpoint.parent.parent / METRICS_FILE  # <run>/checkpoints/step_XXXXXXXX
    if type(step) is int and metrics.is_file():
        points = read_run(metrics, "run").points
        at_step = {key: by_step[float(step)] for (kind, key), by_step in points.items()
                   if kind == "eval" and key.startswith("knn_") and float(step) in by_step}
        if "knn_top1" in at_step:
            rows.append({"evaluation": "kNN monitor during training", "top1": at_step["knn_top1"],
                         "top5": at_step.get("knn_top5"),
                         "protocol": f"{int(at_step.get('knn_bank', 0))} bank / {int(at_step.get('knn_queries', 0))} "
                                     "query images (eval.* settings of the run)"})
    return rows


def model_card(facts: Dict[str, Any], name: str) -> str:
    """README.md of a hub folder: timm's generate_readme front matter and details, then the results
    (or a plain statement that there are none), how to load it, and the run config."""
    import yaml
    from timm.models._hub import generate_readme  # the card push_to_hf_hub writes; not re-exported by timm.models

    kwargs = {k: v for k, v in facts["timm_kwargs"].items() if k != "model_name"}
    training = [f"step {facts['step']}"]
    if facts["epoch"] is not None:
        training.append(f"{facts['epoch']}" + (f" of {facts['epochs']}" if facts["epochs"] is not None else "")
                        + " epochs completed")
    if facts["engine"]:
        training.append(f"engine {facts['engine']}")
    card = {
        "tags": [HUB_TASK, "timm", "scale", facts["objective"]],
        "license": "other",
        "description": (f"A ViT encoder pre-trained by scale with the {facts['objective']} "
                        f"objective and {facts['mask']} masks, exported by `scale-export --hub-dir`. It has no "
                        "classifier: `model(images)` is the CLS embedding. Whoever publishes these weights sets "
                        "their license; the pre-training data's terms apply."),
        "details": {
            "Model Type": "Image feature backbone (self-supervised, no classifier)",
            "Method": f"objective {facts['objective']}, masks {facts['mask']}",
            "Architecture": f"{facts['timm_kwargs']['model_name']} with "
                            + ", ".join(f"{k}={v}" for k, v in kwargs.items()),
            "Params (M)": f"{facts['num_params'] / 1e6:.2f}",
            "scale model preset": facts["scale_model"],
            "Pre-training data": facts["data"],
            "Training": ", ".join(training),
            "Source checkpoint": facts["checkpoint"],
        },
    }
    text = generate_readme(card, name, task_name=HUB_TASK)
    text += "\n## Evaluation\n"
    if facts["results"]:
        text += "\n| Evaluation | Top-1 (%) | Top-5 (%) | Protocol |\n|---|---|---|---|\n"
        for row in facts["results"]:
            top5 = f"{row['top5']:.2f}" if isinstance(row["top5"], (int, float)) else "-"
            text += f"| {row['evaluation']} | {row['top1']:.2f} | {top5} | {row['protocol']} |\n"
    else:
        text += (f"\nNone: the run holds no evaluation of this checkpoint (no `scale-eval knn` or `scale-eval "
                 f"linprobe` results beside it, no kNN monitor record at step {facts['step']}), so its quality "
                 "is unmeasured.\n")
    text += (f"\n## Usage\n\n```python\nimport timm\n\nmodel = timm.create_model(\"local-dir:{name}\", "
             "pretrained=True).eval()  # or \"hf-hub:<user>/<repo>\" once uploaded\n"
             "config = timm.data.resolve_model_data_config(model)  # the run's normalisation\n"
             "transform = timm.data.create_transform(**config)\n"
             "embedding = model(transform(image).unsqueeze(0))  # CLS token; forward_features: every token\n```\n")
    if facts["config"]:
        text += ("\n## Training recipe\n\nThe run config saved with the checkpoint, as in the run's "
                 "config.yaml (`scale-train --config FILE` reads it):\n\n```yaml\n"
                 + yaml.safe_dump(facts["config"], sort_keys=False) + "```\n")
    return text


def _export_command(args: argparse.Namespace) -> int:
    if args.hub_dir:
        facts = export_hub_dir(args.checkpoint, args.hub_dir, args.model)
        print(f"exported {facts['scale_model']} encoder (checkpoint {facts['checkpoint']}) to {args.hub_dir}: "
              f"config.json, model.safetensors, README.md ({len(facts['results'])} evaluation results); load with "
              f"timm.create_model('local-dir:{args.hub_dir}', pretrained=True)")
        return 0
    from .eval.results import check_output_file

    check_output_file(Path(args.out), "--out", "model.safetensors")  # before the checkpoint is read
    metadata = export_encoder(args.checkpoint, args.out, args.model)
    kwargs = json.loads(metadata["timm_kwargs"])
    name = kwargs.pop("model_name")
    print(f"exported {metadata['scale_model']} encoder ({metadata['source_format']} checkpoint "
          f"{metadata['source_checkpoint']}) to {args.out}; load with timm.create_model({name!r}, "
          + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = CommandParser(prog="python -m scale.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir (step_XXXXXXXX), or a run dir (newest)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="output .safetensors file")
    target.add_argument("--hub-dir", help="a new folder for the Hugging Face hub and timm: config.json, "
                                          "model.safetensors and a README.md model card")
    parser.add_argument("--model", default="", help="model preset, only for checkpoints without a saved config")
    args = parser.parse_args(argv)
    return run_command("scale.export", lambda: _export_command(args))


if __name__ == "__main__":
    sys.exit(main())
