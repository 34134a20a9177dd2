"""Invariant 1: loss, output and every parameter gradient equal the unmodified model's."""
import pytest

from distributed import run_ranks
import workers

NAMES = ["nanogpt", "no_position", "parallel_block", "gpt2", "llama", "bert"]
TOL = 2e-5  # fp32 round-off, relative to the gradient scale


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda t: f"t{t}")
def results(request):
    t = request.param
    modes = [True, False] if t > 1 else [True]
    return t, run_ranks(workers.parity, t, NAMES, modes, timeout=600)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("sp", [True, False], ids=["sp", "tp_only"])
def test_same_function(results, name, sp):
    t, per_rank = results
    if (name, sp) not in per_rank[0]:
        pytest.skip("t=1 has one layout")
    for rank, res in enumerate(per_rank):
        r = res[(name, sp)]
        assert not r["missing"] and not r["none_mismatch"], r
        assert r["loss"] < TOL, (rank, r)
        assert r["output"] < 1e-4, (rank, r)
        assert r["grad"] < TOL * max(1.0, r["scale"]), (rank, r)
