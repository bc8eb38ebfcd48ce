"""bench/quality_fashion_mnist.py: bad command lines fail before any work, naming the option."""
import pytest

from conftest import REPO

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def quality_bench():
    from bench import quality_fashion_mnist  # the repo root is on sys.path (conftest.py)
    return quality_fashion_mnist


@pytest.mark.parametrize("argv, named", [
    (["--skip-training", "--skip-baselines"], "--skip-baselines"),
    (["--timing-steps", "2"], "--timing-steps 2"),
    (["--recipe", "no-such-recipe.yaml"], "no-such-recipe.yaml"),
    (["mask.ratio=2"], "mask.ratio"),
    (["--probe", "probe.epochs=1"], "probe.warmup_epochs"),
])
def test_bad_arguments_are_refused_before_any_work(quality_bench, tmp_path, capsys, argv, named):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        quality_bench.main([*argv, "--out-dir", str(out), "--data-dir", str(tmp_path / "no-shards")])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()  # refused before creating anything


def test_markdown_table_has_one_row_per_encoder(quality_bench):
    rows = [{"name": "raw pixels", "trained_min": None, "step": None, "knn_top1": 84.594, "linear_top1": 84.586},
            {"name": "OCL 5 min", "trained_min": 5.04, "step": 635, "knn_top1": 81.39, "linear_top1": 82.08}]
    table = quality_bench.markdown(rows, 60000).splitlines()
    assert table[0].startswith("| encoder |") and "60000 bank" in table[0]
    assert table[2] == "| raw pixels | - | - | 84.59% | 84.59% |"
    assert table[3] == "| OCL 5 min | 5.0 | 635 | 81.39% | 82.08% |"


@pytest.mark.parametrize("argv, named", [
    (["--epochs", "0"], "--epochs 0"),
    (["--only", "nope"], "--only nope"),
    (["--only", "MAE", "--seeds", "0", "--data-dir", "/nonexistent-shards"], "/nonexistent-shards/train"),
])
def test_seed_study_refuses_bad_input_in_one_line(tmp_path, argv, named):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "bench.seed_study", "--study", "asl", *argv,
                           "--out-dir", str(tmp_path / "study")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if "error" in line]) == 1
