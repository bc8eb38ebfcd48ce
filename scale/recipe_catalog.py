"""The shipped recipes, by name: `ocl_vitb16` (or `ocl_vitb16.yaml`) is recipes/ocl_vitb16.yaml wherever
scale is installed; likewise the DeepSpeed JSON configs (recipes/deepspeed/) and accelerate configs
(recipes/accelerate/).

Where they are: a wheel ships the checkout's top-level recipes/ folder as scale/recipes/ (setup.py);
an editable install, or a checkout on PYTHONPATH, reads the checkout's recipes/ itself.

    python -m scale.recipe_catalog     prints the folder and the recipe names
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from .errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent


def recipes_dir() -> Path:
    """The folder holding the recipes: the installed copy, else the checkout's recipes/."""
    installed = _PACKAGE / "recipes"
    return installed if installed.is_dir() else _PACKAGE.parent / "recipes"


def recipe_names() -> List[str]:
    """The names `resolve_recipe` accepts: the stems of the recipe folder's YAML files, sorted."""
    return sorted(path.stem for path in recipes_dir().glob("*.yaml"))


def resolve_recipe(given: str | Path) -> Path:
    """The recipe file that `given` names: an existing path as it is (it wins over a name), else a
    recipe name with or without `.yaml`; anything else is a ConfigError listing the names."""
    path = Path(given)
    if path.exists():
        return path
    names = recipe_names()
    available = f"recipe names: {', '.join(names)}" if names else f"no recipes found in {recipes_dir()}"
    if path.name != str(given):  # a path with folders that is not there
        raise ConfigError(f"recipe {str(given)!r} does not exist (give a path or a recipe name; {available})")
    candidate = recipes_dir() / f"{path.name.removesuffix('.yaml')}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"recipe {str(given)!r} is neither a file nor a recipe name ({available})")


def deepspeed_config(stage: int) -> Path:
    """The shipped DeepSpeed JSON config of ZeRO stage `stage` (recipes/deepspeed/zero{stage}.json)."""
    return recipes_dir() / "deepspeed" / f"zero{stage}.json"


def main() -> int:
    print(f"recipes in {recipes_dir()}:")
    for name in recipe_names():
        print(f"  {name}")
    for folder in ("deepspeed", "accelerate"):
        for path in sorted((recipes_dir() / folder).glob("*")):
            print(f"{folder} config: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
