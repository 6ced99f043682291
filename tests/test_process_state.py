"""Plans do not depend on process-wide state that another thread (or the engine) may set.

vLLM and SGLang call the planner on every rank and broadcast nothing; a plan that reads
torch's or Python's global state can differ between ranks whose processes set it
differently, and can change under a thread planning while another one sets it.
Found by the twelfth-session concurrency pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import eplb


@pytest.fixture
def default_dtype():
    """Set torch's default dtype for one test, restored after it."""
    before = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_nearest_plans_do_not_depend_on_torchs_default_dtype(default_dtype, dtype):
    # the node repair of the nearest dispatch shuffled its starts with torch.rand in the
    # default dtype: float64 drew other numbers (engines set the default dtype to load
    # models); these shapes and seeds changed plans before
    cases = [(2, 32, 48, 8, 2, 1), (2, 64, 96, 16, 4, 2)]
    for layers, experts, replicas, gpus, nodes, seed in cases:
        rng = np.random.default_rng(seed)
        weight = torch.from_numpy(np.rint(rng.lognormal(0, 1.5, (layers, experts)) * 100))
        want = eplb.plan(weight, replicas, gpus, nodes, 1, policy="global", dispatch="nearest",
                         fair="avoid").phy2log
        default_dtype(dtype)
        got = eplb.plan(weight, replicas, gpus, nodes, 1, policy="global", dispatch="nearest",
                        fair="avoid").phy2log
        default_dtype(torch.float32)
        assert torch.equal(got, want), (layers, experts, replicas, gpus, nodes, seed)


def test_reading_pt_files_from_threads_leaves_the_warning_filters_as_they_were(tmp_path):
    # each .pt load hid torch's protocol warning with warnings.catch_warnings, which saves
    # and restores the process-wide filter list: loads in several threads restored each
    # other's copies and left "ignore UserWarning" behind for the whole process
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from eplb.formats import read_loads

    paths = []
    for i in range(8):
        paths.append(tmp_path / f"loads{i}.pt")
        torch.save({"logical_count": torch.randint(0, 100, (3, 16))}, paths[-1])
    before = list(warnings.filters)
    with ThreadPoolExecutor(8) as pool:
        for _ in range(20):
            list(pool.map(read_loads, paths * 4))
    assert warnings.filters == before
