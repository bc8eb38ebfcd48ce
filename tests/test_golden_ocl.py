"""OCL's losses stay those recorded before the method-contract refactor (tests/golden/)."""
import json
import math

import pytest

from golden.ocl_runs import CONFIGS, GOLDEN, run

RECORDED = json.loads(GOLDEN.read_text())["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.long) if n in ("fsdp_2", "ddp_2_grad_cache", "single_grad_cache")
                                  else n for n in sorted(CONFIGS)])
def test_ocl_losses_equal_the_golden_file(name, tmp_path):
    losses = run(name, tmp_path)
    assert len(losses) == len(RECORDED[name]) == 6
    for step, (got, want) in enumerate(zip(losses, RECORDED[name]), start=1):
        # fp32 on CPU with pinned kernels: equal up to float rounding of a different CPU's BLAS
        assert math.isclose(got, want, rel_tol=1e-5), (name, step, got, want)
