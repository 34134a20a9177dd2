"""The compile paths on a ParallelModule: torch.compile with autoseqpar.backend(), and
transform(..., compiler=...): the same gradients as the unmodified model, collectives in the
compiled graphs, dropout replayed exactly under a memory budget."""
import pytest

from distributed import run_ranks
import workers

TOL = 2e-5


def _check(per_rank):
    for res in per_rank:
        for key, r in res.items():
            assert r["partitions"] >= 1, key
            assert r["loss"] < TOL, (key, r)
            assert r["grad"] < TOL * max(1.0, r["scale"]), (key, r)
            fw, bw = r["collectives"]
            assert fw > 0 and bw > 0, (key, r)  # the collectives run inside the compiled graphs


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [1, 2])
def test_backend_on_parallel_module_gives_eager_gradients(world):
    res = run_ranks(workers.compiled_parity, world, ["nanogpt", "gpt2"],
                    [("backend", "eager")], timeout=500)
    _check(res)


@pytest.mark.timeout(900)
def test_inductor_compiles_the_sharded_graph():
    """Inductor generates the kernels (a C++ compiler is on the CI machine), collectives stay
    in the graph; through the backend and through transform(compiler=)."""
    res = run_ranks(workers.compiled_parity, 2, ["nanogpt"],
                    [("backend", "inductor"), ("transform", "inductor")], timeout=800)
    _check(res)


@pytest.mark.timeout(600)
def test_compiled_dropout_budget_equals_no_recompute_under_one_seed():
    for r in run_ranks(workers.compiled_dropout, 2, timeout=500):
        assert r["diff"] == 0.0, r
        assert r["saved"][str({"memory_budget": 0.3})] < r["saved"][str({"recompute": "none"})]
