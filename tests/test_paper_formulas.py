"""Saved activation bytes per layer per rank against Korthikanti et al.'s formulas (within 2%).

The nanoGPT-style model has explicit softmax attention, dropout and bf16 activations, so every
tensor of the paper's accounting exists. s=128, b=2, h=256, a=8 (5as/h = 20), 2 layers.
"""
import pytest

from distributed import run_ranks
import workers

S, B, H, A, L = 128, 2, 256, 8, 2
SIZES = (S, B, H, A, L)
MODES = [(True, "none"), (True, "paper"), (False, "none"), (True, "full")]
# The default ("auto") at the scale of the measurements, 4 layers: its 3% allowance is a
# fraction of the estimated step, which tiny layers (latency-bound) would distort.
AUTO_SIZES = (512, 2, 1024, 16, 4)


def expected(t: int, sp: bool, recompute: str) -> float:
    """Bytes per layer per rank, the paper's table (16-bit activations, 1-byte masks)."""
    sbh = S * B * H
    if recompute == "full":
        return 2 * sbh / t
    if not sp:
        return sbh * (10 + 24 / t + 5 * A * S / (H * t))
    if recompute == "paper":
        return 34 * sbh / t
    return sbh / t * (34 + 5 * A * S / H)


def check(t: int, res: dict) -> None:
    sbh_t = S * B * H / t
    for (sp, rec), r in res.items():
        layers = {k: v for k, v in r["per_layer"].items() if k is not None}
        assert len(layers) == L, r["per_layer"]
        for layer, got in layers.items():
            want = expected(t, sp, rec)
            assert got == pytest.approx(want, rel=0.02), (t, sp, rec, layer, got / sbh_t, want / sbh_t)
        # autograd's own saved-tensor hooks on a real step see what the graph accounting says
        # (distinct storages; the graph counts a saved view of an input separately)
        assert r["hooked_total"] == pytest.approx(r["graph_total"], rel=0.02, abs=16 * 1024), r


def check_auto(t: int, res: dict) -> None:
    s, b, h, a, n = AUTO_SIZES
    sbh_t = s * b * h / t
    r = res[(True, "auto")]
    layers = [v for k, v in r["per_layer"].items() if k is not None]
    assert len(layers) == n
    assert sum(layers) / n <= 34 * sbh_t * 1.02, (t, [x / sbh_t for x in layers])
    assert min(layers) <= 24 * sbh_t  # the layers that take the aggressive plan reach 22 sbh/t
    assert r["flops_frac"] <= 0.03 and r["time_frac"] <= 0.03 + 1e-9, r


@pytest.mark.timeout(600)
def test_formulas_at_t2_on_real_ranks():
    res = run_ranks(workers.activation_bytes, 2, SIZES, MODES, timeout=500)
    for r in res:
        check(2, r)
    res = run_ranks(workers.activation_bytes, 2, AUTO_SIZES, [(True, "auto")], False, timeout=500)
    for r in res:
        check_auto(2, r)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("t", [4, 8])
def test_formulas_at_t4_t8_on_a_fake_group(fake_group, t):
    fake_group(t)
    check(t, workers.activation_bytes(0, t, SIZES, MODES))
    check_auto(t, workers.activation_bytes(0, t, AUTO_SIZES, [(True, "auto")], False))
