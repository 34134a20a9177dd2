"""autoseqpar.backend(): the recompute partitioner as a torch.compile backend, no process group."""
import pytest
import torch

import autoseqpar
from models import NanoGPT, hf_gpt2

OPTIONS = [{"recompute": "none"}, {}, {"recompute": "full"}, {"memory_budget": 0.5}]


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _run(model, loss, backend=None, seed=None):
    model.zero_grad()
    runner = model
    if backend is not None:
        torch._dynamo.reset()
        runner = torch.compile(model, backend=backend)
    if seed is not None:
        torch.manual_seed(seed)
    loss(runner).backward()
    return _grads(model)


CASES = {
    "nanogpt": (lambda d: NanoGPT(n_layer=2, dropout=d), lambda ids: lambda m: m(ids, ids)[1]),
    "gpt2": (lambda d: hf_gpt2(dropout=d), lambda ids: lambda m: m(ids, labels=ids).loss),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_gradients_equal_eager(name):
    build, make_loss = CASES[name]
    torch.manual_seed(0)
    model = build(0.0)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = make_loss(ids)
    ref = _run(model, loss)
    saved = {}
    for opt in OPTIONS:
        be = autoseqpar.backend(**opt)
        got = _run(model, loss, be)
        assert all(torch.allclose(g, r, atol=1e-6, rtol=1e-5) for g, r in zip(got, ref)), opt
        assert be.partitions, "the backend partitioned nothing"
        saved[str(opt)] = sum(p.saved_bytes for p in be.partitions)
    none = saved[str({"recompute": "none"})]
    assert saved[str({"recompute": "full"})] < saved[str({})] <= none
    assert saved[str({"memory_budget": 0.5})] <= 0.5 * none


@pytest.mark.timeout(300)
def test_backend_with_dropout_matches_no_recompute_under_one_seed():
    torch.manual_seed(0)
    model = NanoGPT(n_layer=2, dropout=0.1)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = CASES["nanogpt"][1](ids)
    ref = _run(model, loss, autoseqpar.backend(recompute="none"), seed=5)
    for opt in ({"memory_budget": 0.3}, {"recompute": "full"}, {}):
        got = _run(model, loss, autoseqpar.backend(**opt), seed=5)
        assert all(torch.equal(g, r) for g, r in zip(got, ref)), opt


def test_backend_refuses_unknown_options():
    with pytest.raises(autoseqpar.ConfigError, match="recompute="):
        autoseqpar.backend(recompute="sometimes")
    with pytest.raises(autoseqpar.ConfigError, match="inner="):
        autoseqpar.backend(inner="tvm")


@pytest.mark.timeout(600)
def test_backend_with_inductor_on_a_plain_model():
    """Inductor generates the kernels with autoseqpar's partitioner in place of its own."""
    torch.manual_seed(0)
    model = NanoGPT(n_layer=2)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = CASES["nanogpt"][1](ids)
    ref = _run(model, loss)
    be = autoseqpar.backend(inner="inductor", memory_budget=0.5)
    got = _run(model, loss, be)
    assert all(torch.allclose(g, r, atol=1e-6, rtol=1e-5) for g, r in zip(got, ref))
    assert be.partitions and be.partitions[-1].policy == "budget"
