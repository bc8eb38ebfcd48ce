"""A non-editable install works away from the checkout: a wheel built from this checkout, installed into
a fresh venv, runs `scale-train --config <recipe name>` from another folder, ships the DeepSpeed and
accelerate configs as package data, has every console script, and installs no top-level `data_prep`.

Offline: the wheel is built with --no-build-isolation from a copy of the checkout (so a stale build/
folder cannot leak into it), and the temp venv sees .venv's already-installed dependencies through a
plain path line in a .pth file, which does not run .venv's editable-install hook: `scale` there is
the wheel's copy only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Top-level entries of the checkout that a build does not need (and stale build output).
NOT_COPIED = {".git", ".venv", "build", "dist", "runs", "data", ".pytest_cache"}
OWN_SCRIPTS = ("scale-train", "scale-eval", "scale-export", "scale-prep-imagefolder", "scale-prep-fashion-mnist",
               "scale-verify-shards")


def clean_env() -> dict:
    """No PYTHONPATH or venv variables: only what the interpreter's own site-packages provide."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    return env


def run(command: list, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=clean_env(), capture_output=True,
                            text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def venv_with_dependencies(path: Path) -> Path:
    """A venv without pip and without scale, seeing .venv's site-packages; returns its python."""
    run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent)
    python = path / "bin" / "python"
    site_packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             cwd=path).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site_packages / "dependencies.pth").write_text("".join(f"{line}\n" for line in ours))
    return python


def python_in(python: Path, code: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([python, "-c", code], cwd=cwd, check=check)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a temp venv with the wheel of this checkout installed (not editable)."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=lambda folder, names: (
        {n for n in names if n in NOT_COPIED or n.endswith(".egg-info")} if Path(folder) == REPO else set())
        | {n for n in names if n == "__pycache__"})
    wheels = root / "wheels"
    run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "--no-index",
         "-w", wheels], cwd=root)
    (wheel,) = wheels.glob("scale-*.whl")
    python = venv_with_dependencies(root / "venv")
    assert python_in(python, "import scale", root, check=False).returncode != 0  # .venv's editable scale is not seen
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=root)
    return python.parent


@pytest.mark.slow
def test_the_installed_copy_is_used_and_data_prep_is_not_installed(installed: Path, tmp_path: Path) -> None:
    venv = installed.parent.resolve()
    where = python_in(installed / "python", "import scale; print(scale.__file__)", tmp_path).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv), where
    result = python_in(installed / "python", "import data_prep", tmp_path, check=False)
    assert result.returncode != 0 and "No module named 'data_prep'" in result.stderr


@pytest.mark.slow
def test_recipes_by_name_from_any_folder(installed: Path, tmp_path: Path) -> None:
    for recipe, model in (("ocl_vitb16", "vit_base_patch16"), ("mae_vitl16.yaml", "vit_large_patch16")):
        out = run([installed / "scale-train", "--config", recipe, "--print-config"], cwd=tmp_path).stdout
        assert f"name: {model}" in out
    assert "recipe name" in run([installed / "scale-train", "--help"], cwd=tmp_path).stdout


@pytest.mark.slow
def test_an_existing_file_wins_over_a_recipe_name(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "ocl_vitb16.yaml").write_text("model:\n  name: vit_small_patch16\n")
    out = run([installed / "scale-train", "--config", "ocl_vitb16.yaml", "--print-config"], cwd=tmp_path).stdout
    assert "name: vit_small_patch16" in out


@pytest.mark.slow
def test_an_unknown_recipe_name_is_one_line_listing_the_names(installed: Path, tmp_path: Path) -> None:
    result = run([installed / "scale-train", "--config", "ocl_vitz99", "--print-config"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "'ocl_vitz99'" in result.stderr and "ocl_vitb16" in result.stderr and "mae_vitb16" in result.stderr


def test_deepspeed_and_accelerate_configs_are_package_data(installed: Path, tmp_path: Path) -> None:
    code = ("import json; from scale import recipe_catalog as c; "
            "print(json.dumps([str(c.deepspeed_config(s)) for s in (1, 2, 3)] "
            "+ [str(p) for p in sorted((c.recipes_dir() / 'accelerate').glob('*.yaml'))]))")
    paths = [Path(p) for p in json.loads(python_in(installed / "python", code, tmp_path).stdout)]
    assert [p.name for p in paths] == ["zero1.json", "zero2.json", "zero3.json", "ddp.yaml", "deepspeed.yaml",
                                      "fsdp.yaml"]
    for path in paths:
        assert path.is_file() and path.resolve().is_relative_to(installed.parent.resolve()), path
    assert json.loads(paths[0].read_text())["zero_optimization"]["stage"] == 1


@pytest.mark.slow
def test_console_scripts(installed: Path, tmp_path: Path) -> None:
    code = ("from importlib.metadata import entry_points; print(' '.join(e.name for e in "
            "entry_points(group='console_scripts') if e.value.startswith('scale')))")
    declared = python_in(installed / "python", code, tmp_path).stdout.split()
    assert set(OWN_SCRIPTS) | {"scale-plot", "scale-demo", "scale-mask-pictures"} <= set(declared)
    for name in declared:
        assert (installed / name).is_file(), name
    for name in OWN_SCRIPTS[1:]:  # scale-train's --help is checked above
        assert "usage:" in run([installed / name, "--help"], cwd=tmp_path).stdout, name


def test_data_prep_file_form_runs_where_scale_is_not_installed(tmp_path: Path) -> None:
    """`python data_prep/verify_shards.py` from another folder, with an interpreter that has scale's
    dependencies but not scale: the script makes the checkout importable itself."""
    python = venv_with_dependencies(tmp_path / "venv")
    assert python_in(python, "import scale", tmp_path, check=False).returncode != 0
    for script in ("verify_shards", "imagefolder_to_wds", "fashion_mnist_to_wds"):
        assert "usage:" in run([python, REPO / "data_prep" / f"{script}.py", "--help"], cwd=tmp_path).stdout
