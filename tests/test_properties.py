"""Sharding sizes, inserted collectives, replicated gradients, state dict, no mutation, dropout."""
import pytest

from distributed import run_ranks
import workers


@pytest.fixture(scope="module")
def props():
    return run_ranks(workers.properties, 2, timeout=300)


@pytest.mark.timeout(400)
def test_weight_shards_are_one_over_t(props):
    for res in props:
        assert res["shard_ratios"], "nothing was sharded"
        assert all(abs(r - 0.5) < 1e-9 for r in res["shard_ratios"].values()), res["shard_ratios"]
        # every linear in the blocks is split: 4 weights (+ 2 column biases) per layer, 2 layers
        assert len(res["shard_ratios"]) == 2 * 6


@pytest.mark.timeout(400)
def test_plan_is_megatron(props):
    plan = props[0]["plan"]
    assert plan["transformer.h.0.attn.c_attn"] == "colwise"
    assert plan["transformer.h.0.attn.c_proj"] == "rowwise"
    assert plan["transformer.h.1.mlp.c_fc"] == "colwise"
    assert plan["transformer.h.1.mlp.c_proj"] == "rowwise"
    assert plan["transformer.h.0.ln_1"] == "sequence"
    assert plan["transformer.ln_f"] == "sequence"
    assert plan["transformer.wte"] == "replicated"


@pytest.mark.timeout(400)
def test_collectives_are_sequence_gathers_and_reduce_scatters(props):
    kinds = props[0]["collectives"]
    # The token dimension: dim 1 of (b, s, h), or dim 0 of GPT-2's Conv1D view (b*s, h), which
    # holds b blocks of s tokens each.
    tokens = {(1, 1, "seq"), (0, 2, "seq")}
    # per layer: one all-gather before QKV and one before fc1; one reduce-scatter after each row
    assert len(kinds["all_gather"]) == 4 and set(kinds["all_gather"]) <= tokens
    assert len(kinds["reduce_scatter"]) == 4 and set(kinds["reduce_scatter"]) <= tokens
    assert kinds["gather"] == [(1, 1, "seq")]  # before the (tied, replicated) LM head
    assert "all_reduce" not in kinds  # no plain-TP all-reduce under sequence parallelism
    assert all(spec[2] == "seq" for spec in kinds["scatter"])


@pytest.mark.timeout(400)
def test_layernorm_grads_identical_on_all_ranks(props):
    for res in props:
        assert res["ln_grads_identical"] and all(res["ln_grads_identical"].values())


@pytest.mark.timeout(400)
def test_gather_state_dict_round_trips_bit_for_bit(props):
    for res in props:
        assert res["keys_equal"]
        assert res["roundtrip_exact"]


@pytest.mark.timeout(400)
def test_user_model_is_not_mutated(props):
    for res in props:
        assert res["unchanged"]
        assert res["orig_still_runs"]


@pytest.mark.timeout(400)
def test_clip_grad_norm_is_the_global_norm(props):
    for res in props:
        got, ref = res["clip_norm"]
        assert got == pytest.approx(ref, rel=1e-5)


@pytest.mark.timeout(400)
def test_dropout_masks_differ_across_ranks_and_repeat_with_the_seed():
    res = run_ranks(workers.dropout_streams, 2, timeout=300)
    for r in res:
        assert r["losses"][0] == r["losses"][1]  # same seed, same masks, same losses
        assert r["losses"][0][0] != r["losses"][0][1]  # every step draws new masks
        # every dropout of the nanoGPT runs on shards under SP: the per-rank stream
        assert r["streams"] and set(r["streams"]) == {0}
        assert not r["per_rank_equal"]
        assert r["group_equal"]
