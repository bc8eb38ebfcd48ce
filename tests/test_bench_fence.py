"""bench/ is fenced: its scripts are modules of the package `bench`, run as `python -m bench.<script>` from the
repository root; they import the library and `bench.common` explicitly, none is loaded by file path, none
changes the import path, and the library never imports them."""
from __future__ import annotations

import pytest

from conftest import REPO

LOADED_BY_PATH_OR_PATH_CHANGED = ("spec_from_file_location", "runpy", "sys.path.insert", "sys.path.append",
                                  'os.environ["PYTHONPATH"]')


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "bench").glob("*.py")))
def test_a_bench_script_neither_loads_scripts_by_path_nor_changes_the_import_path(script):
    text = (REPO / "bench" / script).read_text()
    assert [s for s in LOADED_BY_PATH_OR_PATH_CHANGED if s in text] == []


def test_the_library_does_not_import_the_benches():
    importers = [str(p.relative_to(REPO)) for p in (REPO / "scale").rglob("*.py")
                 if "import bench" in p.read_text() or "from bench" in p.read_text()]
    assert importers == []
