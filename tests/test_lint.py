"""The tree is clean under ruff's rule set (ruff.toml), and the rule set catches what it is there for."""
import subprocess
import sys
from pathlib import Path

from conftest import REPO

RUFF = Path(sys.executable).with_name("ruff")


def test_the_tree_is_clean_under_ruff():
    done = subprocess.run([str(RUFF), "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]


def test_the_rules_catch_an_undefined_name_and_an_unused_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    done = subprocess.run([str(RUFF), "check", "--config", str(REPO / "ruff.toml"), str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "F401" in done.stdout and "F821" in done.stdout, done.stdout
