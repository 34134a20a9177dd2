"""Unit tests of the sharding rules (passes/propagate.py) and of the layout helpers
(passes/layout.py), on tiny exported aten graphs. Single process, no process group."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from passes.layout import (PARTIAL, REPLICATE, Partial, Replicate, Shard, local_shape,
                           shard_tensor, unshard_tensor)
from passes.propagate import NoRule, Propagation, propagate, reshape_spec

aten = torch.ops.aten


# ------------------------------------------------------------------------------ helpers

def export(module, *args):
    module = module if isinstance(module, nn.Module) else _Fn(module)
    return torch.export.export(module, tuple(args), strict=False).graph_module


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):  # the input placeholder is named ``x``
        return self.fn(x)


def nodes_of(gm, packet):
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "overloadpacket", None) is packet]


def node_of(gm, packet):
    found = nodes_of(gm, packet)
    assert len(found) == 1, f"expected one {packet} node, got {found}"
    return found[0]


def _user_input(gm):
    """The only placeholder that is not a lifted parameter (``p_*``)."""
    (x,) = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.name.startswith("p_")]
    return x


def placeholder(gm, name):
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name)


def check_reshape_on_values(in_shape, out_shape, spec, out_spec, t):
    """The rule is right iff reshaping every rank's input shard to the local output shape
    gives that rank's shard of the reshaped full tensor."""
    x = torch.arange(math.prod(in_shape), dtype=torch.float32).reshape(in_shape)
    y = x.reshape(out_shape)
    loc = local_shape(out_shape, out_spec, t)
    for r in range(t):
        got = shard_tensor(x, spec, r, t).reshape(loc)
        assert torch.equal(got, shard_tensor(y, out_spec, r, t)), (r, in_shape, out_shape)


# ------------------------------------------------------------------------- reshape_spec

def test_reshape_split_heads_keeps_plain_shard():
    out = reshape_spec((2, 8, 32), (2, 8, 4, 8), Shard(2), 2)
    assert out == Shard(2, 1, "tp")  # the heads dimension, contiguous
    check_reshape_on_values((2, 8, 32), (2, 8, 4, 8), Shard(2), out, 2)


def test_reshape_merge_heads_back():
    out = reshape_spec((2, 8, 4, 8), (2, 8, 32), Shard(2), 2)
    assert out == Shard(2, 1, "tp")
    check_reshape_on_values((2, 8, 4, 8), (2, 8, 32), Shard(2), out, 2)


@pytest.mark.parametrize("t", [2, 4])
def test_reshape_flatten_tokens_gives_batch_blocks(t):
    spec = Shard(1, 1, "seq")
    out = reshape_spec((2, 8, 32), (16, 32), spec, t)
    assert out == Shard(0, 2, "seq")  # b=2 blocks of s tokens each, kind kept
    check_reshape_on_values((2, 8, 32), (16, 32), spec, out, t)
    # and back: unflattening restores the plain token shard
    back = reshape_spec((16, 32), (2, 8, 32), out, t)
    assert back == spec


def test_reshape_fused_qkv_lands_on_heads():
    spec = Shard(2, 3)
    out = reshape_spec((2, 8, 96), (2, 8, 3, 4, 8), spec, 2)
    assert out == Shard(3, 1, "tp")  # the heads dimension, not the q/k/v dimension
    check_reshape_on_values((2, 8, 96), (2, 8, 3, 4, 8), spec, out, 2)


def test_reshape_negative_dim_is_normalized():
    assert reshape_spec((2, 8, 32), (2, 8, 4, 8), Shard(-1), 2) == Shard(2)


def test_reshape_non_divisible_heads_raises_divisibility():
    # 2 heads of 16 over 4 ranks: no dimension of (2, 16) holds 4 contiguous pieces
    with pytest.raises(NoRule) as e:
        reshape_spec((2, 8, 32), (2, 8, 2, 16), Shard(2), 4)
    assert e.value.kind == "divisibility"
    assert "not divisible by 4" in e.value.reason


def test_reshape_dimension_not_divisible_by_blocks_times_t():
    with pytest.raises(NoRule) as e:
        reshape_spec((2, 8, 30), (2, 8, 5, 6), Shard(2), 4)
    assert e.value.kind == "divisibility"


# --------------------------------------------------------------- reshape through the graph

def test_view_node_uses_reshape_rule():
    gm = export(lambda x: x.view(2, 8, 4, 8), torch.randn(2, 8, 32))
    x = placeholder(gm, "x")
    prop = propagate(node_of(gm, aten.view), {x: Shard(2)}, 2)
    assert prop.out == Shard(2) and prop.slices == {} and prop.broadcast == ()


def test_transpose_moves_the_shard():
    gm = export(lambda x: x.transpose(1, 2), torch.randn(2, 8, 4, 8))
    x = placeholder(gm, "x")
    assert propagate(node_of(gm, aten.transpose), {x: Shard(2)}, 2).out == Shard(1)
    assert propagate(node_of(gm, aten.transpose), {x: Shard(0)}, 2).out == Shard(0)


# ------------------------------------------------------------------------ elementwise

class _Broadcasts(nn.Module):
    def forward(self, x, row, full, vec):
        return x + row, x * full, x + vec


def _broadcast_graph():
    return export(_Broadcasts(), torch.randn(2, 8, 32), torch.randn(2, 1, 32),
                  torch.randn(8, 32), torch.randn(32))


def test_elementwise_size_one_operand_is_broadcast():
    gm = _broadcast_graph()
    x, row = placeholder(gm, "x"), placeholder(gm, "row")
    add = next(n for n in nodes_of(gm, aten.add) if row in n.args)
    prop = propagate(add, {x: Shard(1, 1, "seq")}, 2)
    assert prop.out == Shard(1, 1, "seq")
    assert prop.broadcast == (row,)
    assert prop.slices == {}


def test_elementwise_full_size_operand_is_sliced_with_rank_offset():
    gm = _broadcast_graph()
    x, full = placeholder(gm, "x"), placeholder(gm, "full")
    prop = propagate(node_of(gm, aten.mul), {x: Shard(1, 1, "seq")}, 2)
    assert prop.out == Shard(1, 1, "seq")
    # full is (8, 32), aligned to the right of (2, 8, 32): its token dim is 0
    assert prop.slices == {full: Shard(0, 1, "seq")}
    assert prop.broadcast == ()


def test_elementwise_lower_rank_operand_missing_the_dim_is_broadcast():
    gm = _broadcast_graph()
    x, vec = placeholder(gm, "x"), placeholder(gm, "vec")
    add = next(n for n in nodes_of(gm, aten.add) if vec in n.args)
    prop = propagate(add, {x: Shard(1, 1, "seq")}, 2)
    assert prop.broadcast == (vec,) and prop.slices == {}
    # sharded on the features instead, the same vector must be sliced (blocks carried over)
    prop = propagate(add, {x: Shard(2, 3)}, 2)
    assert prop.out == Shard(2, 3)
    assert prop.slices == {vec: Shard(0, 3)}


def test_elementwise_differently_sharded_operands_mix():
    gm = _broadcast_graph()
    x, full = placeholder(gm, "x"), placeholder(gm, "full")
    with pytest.raises(NoRule) as e:
        propagate(node_of(gm, aten.mul), {x: Shard(1), full: Shard(1)}, 2)
    assert e.value.kind == "mix"


# ---------------------------------------------------------------------------- softmax

def _softmax_graph(dim):
    return export(lambda x: F.softmax(x, dim=dim), torch.randn(2, 4, 8, 8))


def test_softmax_along_the_sharded_dim_mixes():
    gm = _softmax_graph(-1)
    x = placeholder(gm, "x")
    with pytest.raises(NoRule) as e:
        propagate(node_of(gm, aten.softmax), {x: Shard(3)}, 2)
    assert e.value.kind == "mix"


def test_softmax_along_another_dim_keeps_the_shard():
    gm = _softmax_graph(-1)
    x = placeholder(gm, "x")
    assert propagate(node_of(gm, aten.softmax), {x: Shard(1)}, 2).out == Shard(1)  # heads


# ------------------------------------------------------------------------------ split

def _qkv_split_graph():
    return export(lambda x: x.split(32, dim=2), torch.randn(2, 8, 96))


def test_split_into_three_needs_three_blocks():
    gm = _qkv_split_graph()
    x = placeholder(gm, "x")
    with pytest.raises(NoRule) as e:
        propagate(node_of(gm, aten.split), {x: Shard(2, 1)}, 2)
    assert e.value.kind == "blocks"
    assert e.value.need == 3


@pytest.mark.parametrize("t", [2, 4])
def test_split_with_three_blocks_gives_plain_shards(t):
    gm = _qkv_split_graph()
    x = placeholder(gm, "x")
    split = node_of(gm, aten.split)
    prop = propagate(split, {x: Shard(2, 3)}, t)
    assert prop.out == (Shard(2, 1), Shard(2, 1), Shard(2, 1))
    # getitem picks each piece's layout
    items = [u for u in split.users]
    assert len(items) == 3
    for item in items:
        assert propagate(item, {split: prop.out}, t).out == Shard(2, 1)
    # on values: splitting each rank's blocked shard gives that rank's shard of each piece
    full = torch.randn(2, 8, 96)
    for r in range(t):
        local = shard_tensor(full, Shard(2, 3), r, t).split(32 // t, dim=2)
        for got, piece in zip(local, full.split(32, dim=2)):
            assert torch.equal(got, shard_tensor(piece, Shard(2, 1), r, t))


def test_split_along_another_dim_keeps_blocks():
    gm = _qkv_split_graph()
    x = placeholder(gm, "x")
    prop = propagate(node_of(gm, aten.split), {x: Shard(1, 1, "seq")}, 2)
    assert prop.out == (Shard(1, 1, "seq"),) * 3


# ------------------------------------------------------------------------- layer_norm

def _ln_graph():
    return export(nn.LayerNorm(32), torch.randn(2, 8, 32))


def test_layer_norm_over_the_sharded_dim_raises():
    gm = _ln_graph()
    x = _user_input(gm)
    with pytest.raises(NoRule) as e:
        propagate(node_of(gm, aten.layer_norm), {x: Shard(2)}, 2)
    assert e.value.kind == "mix"


def test_layer_norm_on_token_shards_broadcasts_its_weights():
    gm = _ln_graph()
    x = _user_input(gm)
    w, b = placeholder(gm, "p_weight"), placeholder(gm, "p_bias")
    prop = propagate(node_of(gm, aten.layer_norm), {x: Shard(1, 1, "seq")}, 2)
    assert prop.out == Shard(1, 1, "seq")
    assert set(prop.broadcast) == {w, b}
    assert prop.slices == {}


# ---------------------------------------------------------------------------- matmuls

def _linear_graph(bias):
    return export(nn.Linear(32, 16, bias=bias), torch.randn(2, 8, 32))




@pytest.mark.parametrize("bias", [False, True])
def test_row_parallel_linear_gives_partial(bias):
    gm = _linear_graph(bias)
    x, w = _user_input(gm), placeholder(gm, "p_weight")
    prop = propagate(node_of(gm, aten.linear), {x: Shard(2), w: Shard(1)}, 2)
    assert prop.out == PARTIAL
    assert isinstance(prop.out, Partial)


def test_column_parallel_linear_shards_features():
    gm = _linear_graph(True)
    x, w, b = _user_input(gm), placeholder(gm, "p_weight"), placeholder(gm, "p_bias")
    prop = propagate(node_of(gm, aten.linear), {w: Shard(0, 3)}, 2)
    assert prop.out == Shard(2, 3)
    assert prop.broadcast == (b,)  # the replicated view of the bias; the plan shards it


def test_contraction_over_a_shard_without_row_weight_mixes():
    gm = _linear_graph(False)
    x = _user_input(gm)
    with pytest.raises(NoRule) as e:
        propagate(node_of(gm, aten.linear), {x: Shard(2)}, 2)
    assert e.value.kind == "mix"
    # a row weight with different blocks than its input does not pair either
    w = placeholder(gm, "p_weight")
    with pytest.raises(NoRule):
        propagate(node_of(gm, aten.linear), {x: Shard(2, 3), w: Shard(1, 1)}, 2)


def test_tokens_through_a_replicated_weight_stay_sharded():
    gm = _linear_graph(True)
    x, w, b = _user_input(gm), placeholder(gm, "p_weight"), placeholder(gm, "p_bias")
    prop = propagate(node_of(gm, aten.linear), {x: Shard(1, 1, "seq")}, 2)
    assert prop.out == Shard(1, 1, "seq")
    assert set(prop.broadcast) == {w, b}


def test_partial_survives_views_and_scaling_but_not_nonlinearities():
    def fn(x):
        y = x.view(16, 16)
        return y * 2.0, F.gelu(y)
    gm = export(fn, torch.randn(2, 8, 16))
    x = placeholder(gm, "x")
    view = node_of(gm, aten.view)
    assert propagate(view, {x: PARTIAL}, 2).out == PARTIAL
    assert propagate(node_of(gm, aten.mul), {view: PARTIAL}, 2).out == PARTIAL
    with pytest.raises(NoRule) as e:
        propagate(node_of(gm, aten.gelu), {view: PARTIAL}, 2)
    assert e.value.kind == "mix"


def test_reduction_over_the_sharded_dim_mixes_and_over_another_keeps_it():
    gm = export(lambda x: (x.sum(-1), x.mean(1, keepdim=True)), torch.randn(2, 8, 32))
    x = placeholder(gm, "x")
    with pytest.raises(NoRule) as e:
        propagate(node_of(gm, aten.sum), {x: Shard(2)}, 2)
    assert e.value.kind == "mix"
    assert propagate(node_of(gm, aten.sum), {x: Shard(1, 1, "seq")}, 2).out == Shard(1, 1, "seq")
    assert propagate(node_of(gm, aten.mean), {x: Shard(2)}, 2).out == Shard(2)


def test_placeholder_and_unknown_ops_are_unsupported():
    gm = export(lambda x: torch.cumprod(x, 0), torch.randn(4, 4))
    x = placeholder(gm, "x")
    with pytest.raises(NoRule) as e:
        propagate(x, {}, 2)
    assert e.value.kind == "unsupported"
    with pytest.raises(NoRule) as e:
        propagate(node_of(gm, aten.cumprod), {x: Shard(1)}, 2)
    assert e.value.kind == "unsupported"


# ---------------------------------------------------------------------------- layout

def test_shard_tensor_values_blocks_one():
    x = torch.arange(8)
    assert shard_tensor(x, Shard(0), 0, 2).tolist() == [0, 1, 2, 3]
    assert shard_tensor(x, Shard(0), 1, 2).tolist() == [4, 5, 6, 7]
    assert shard_tensor(x, Shard(0), 3, 4).tolist() == [6, 7]


def test_shard_tensor_values_three_blocks():
    # q = 0..3, k = 4..7, v = 8..11: each rank owns its half of each of q, k and v
    x = torch.arange(12)
    assert shard_tensor(x, Shard(0, 3), 0, 2).tolist() == [0, 1, 4, 5, 8, 9]
    assert shard_tensor(x, Shard(0, 3), 1, 2).tolist() == [2, 3, 6, 7, 10, 11]


def test_shard_tensor_of_replicated_or_partial_is_the_full_tensor():
    x = torch.randn(4, 6)
    assert shard_tensor(x, REPLICATE, 1, 2) is x
    assert shard_tensor(x, PARTIAL, 1, 2) is x


@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_shard_unshard_round_trip(t, blocks, dim):
    shape = [2 * 12, 3 * 4 * 2, 24]  # every dim splits into 3 blocks x 4 ranks
    full = torch.randn(shape)
    spec = Shard(dim, blocks)
    parts = [shard_tensor(full, spec, r, t) for r in range(t)]
    for p in parts:
        assert list(p.shape) == local_shape(shape, spec, t)
        assert p.is_contiguous()
    # the parts tile the tensor: disjoint and complete
    assert sum(p.numel() for p in parts) == full.numel()
    assert torch.equal(unshard_tensor(parts, spec), full)


def test_local_shape_checks_divisibility():
    assert local_shape((2, 8, 96), Shard(2, 3), 4) == [2, 8, 24]
    assert local_shape((2, 8, 96), REPLICATE, 4) == [2, 8, 96]
    with pytest.raises(ValueError):
        local_shape((2, 8, 30), Shard(2, 3), 4)


def test_layout_str_and_kind():
    assert str(Shard(1, 2, "seq")) == "S(1x2,seq)"
    assert str(Shard(0)) == "S(0,tp)"
    assert str(Replicate()) == "R" and str(Partial()) == "P"
    assert Shard(1).with_kind("seq") == Shard(1, 1, "seq")
    assert isinstance(Propagation(None).slices, dict)


# ------------------------------------------------- regressions: bugs found by these tests

def test_partial_times_itself_needs_the_full_sum():
    gm = export(lambda x: x * x, torch.randn(2, 8, 16))
    x = placeholder(gm, "x")
    with pytest.raises(NoRule) as e:
        propagate(node_of(gm, aten.mul), {x: PARTIAL}, 2)
    assert e.value.kind == "mix"


def test_vector_norm_over_the_sharded_dim_mixes():
    # an L1 normalization of a column-parallel output over its (sharded) features
    gm = export(lambda x: x.norm(p=1, dim=-1, keepdim=True), torch.randn(2, 8, 32))
    x = placeholder(gm, "x")
    norm = node_of(gm, aten.linalg_vector_norm)
    with pytest.raises(NoRule) as e:
        propagate(norm, {x: Shard(2)}, 2)
    assert e.value.kind == "mix"
    assert propagate(norm, {x: Shard(1, 1, "seq")}, 2).out == Shard(1, 1, "seq")


def test_sdpa_with_only_the_mask_sharded_returns_or_raises_norule():
    class Attn(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    args = [torch.randn(2, 4, 8, 8) for _ in range(4)]
    gm = export(Attn(), *args)
    sdpa = node_of(gm, aten.scaled_dot_product_attention)
    try:
        prop = propagate(sdpa, {placeholder(gm, "mask"): Shard(1)}, 2)
    except NoRule:
        return
    assert prop.out == Shard(1)
