"""Tests of the analyses in passes/match.py and passes/plan.py: for each, a model where the
structure is there (match) and one where it is not (no match). Single process, no group."""
import collections

import pytest
import torch
import torch.nn as nn

from autoseqpar.capture import capture
from models import NanoGPT, hf_gpt2, hf_llama
from passes.layout import Partial, Shard
from passes.match import (Rejection, find_seq_labels, find_seq_region, find_tp_blocks,
                          is_layer_norm)
from passes.options import PassOptions
from passes.plan import plan_layouts
from passes.propagate import matmul_roles
from passes.tensor_parallel import split_row_bias_pass

aten = torch.ops.aten
B, S = 2, 8


def _ids():
    return torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(0))


def _capture_nanogpt():
    torch.manual_seed(0)
    return capture(NanoGPT(n_layer=2), (_ids(),))


@pytest.fixture(scope="module")
def nanogpt():
    return _capture_nanogpt()


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    ids = _ids()
    return capture(hf_gpt2(), ((ids,), {"labels": ids.clone()}))


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    ids = _ids()
    return capture(hf_llama(hidden=32, heads=4, kv_heads=2), ((ids,), {"labels": ids.clone()}))


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def _by_module(analysis):
    """{module path: TPLinear} for every linear of every block."""
    return {l.fqn.rsplit(".", 1)[0]: l for l in analysis.linears}


# ------------------------------------------------------------------ find_tp_blocks: match

def test_nanogpt_blocks(nanogpt):
    a = find_tp_blocks(nanogpt.gm, 2)
    assert len(a.blocks) == 4
    attn0, mlp0, attn1, mlp1 = a.blocks
    for layer, (attn, mlp) in enumerate(((attn0, mlp0), (attn1, mlp1))):
        (col,), (row,) = attn.columns, attn.rows
        assert col.fqn == f"h.{layer}.attn.c_attn.weight" and col.style == "colwise"
        assert col.weight_shard == Shard(0, 3, "tp")  # fused q, k, v: 3 blocks
        assert col.bias_shard == Shard(0, 3, "tp")
        assert row.fqn == f"h.{layer}.attn.c_proj.weight" and row.style == "rowwise"
        assert row.weight_shard == Shard(1, 1, "tp")
        assert row.bias_shard is None  # added once, after the reduction
        assert len(attn.attention) == 1  # the explicit softmax is sharded by heads
        (col,), (row,) = mlp.columns, mlp.rows
        assert col.fqn == f"h.{layer}.mlp.c_fc.weight" and col.weight_shard == Shard(0, 1)
        assert row.fqn == f"h.{layer}.mlp.c_proj.weight" and row.weight_shard == Shard(1, 1)
        assert mlp.attention == ()
    # row outputs are partial sums, column outputs feature shards
    for b in a.blocks:
        for l in b.columns:
            assert isinstance(a.layouts[l.node], Shard)
        for l in b.rows:
            assert isinstance(a.layouts[l.node], Partial)
    # heads: q/k/v views are sharded on the heads dimension
    views = [n for n in nanogpt.gm.graph.nodes if n.op == "call_function"
             and n.target is aten.view.default and len(n.meta["val"].shape) == 4]
    assert len(views) == 6
    assert all(a.layouts[v.name] == Shard(2, 1) for v in views)


def test_nanogpt_tied_lm_head_is_not_sharded(nanogpt):
    a = find_tp_blocks(nanogpt.gm, 2)
    assert all("lm_head" not in l.fqn and "wte" not in l.fqn for l in a.linears)
    lm_head = [n for n in nanogpt.gm.graph.nodes if n.op == "call_function"
               and matmul_roles(n)
               and matmul_roles(n)[1].meta.get("autoseqpar", {}).get("fqn") == "lm_head.weight"]
    assert len(lm_head) == 1
    # either never a candidate (tied weight) or rejected -- never sharded
    assert lm_head[0].name not in a.layouts
    assert all(isinstance(r, Rejection) for r in a.rejected)
    assert "p_lm_head_weight" not in {l.weight for l in a.linears}


def test_hf_gpt2_conv1d_weights_are_stored_in_out(gpt2):
    a = find_tp_blocks(gpt2.gm, 2)
    mods = _by_module(a)
    for layer in range(2):
        c_attn = mods[f"transformer.h.{layer}.attn.c_attn"]
        c_proj = mods[f"transformer.h.{layer}.attn.c_proj"]
        c_fc = mods[f"transformer.h.{layer}.mlp.c_fc"]
        mlp_proj = mods[f"transformer.h.{layer}.mlp.c_proj"]
        for l in (c_attn, c_proj, c_fc, mlp_proj):
            assert _node(gpt2.gm, l.node).target.overloadpacket is aten.addmm
        # Conv1D: weight (in, out): a column splits dim 1, a row splits dim 0
        assert c_attn.style == "colwise" and c_attn.weight_shard == Shard(1, 3)
        assert c_attn.bias_shard == Shard(0, 3)
        assert c_fc.style == "colwise" and c_fc.weight_shard == Shard(1, 1)
        assert c_proj.style == "rowwise" and c_proj.weight_shard == Shard(0, 1)
        assert mlp_proj.style == "rowwise" and mlp_proj.weight_shard == Shard(0, 1)
    assert len(a.blocks) == 4 and len(a.linears) == 8
    assert not [l for l in a.linears if "lm_head" in l.fqn or "wte" in l.fqn]


def test_hf_llama_gqa_projections_found_at_t2(llama):
    a = find_tp_blocks(llama.gm, 2)
    mods = _by_module(a)
    for layer in range(2):
        p = f"model.layers.{layer}"
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                     "mlp.up_proj"):
            assert mods[f"{p}.{name}"].style == "colwise", name
            assert mods[f"{p}.{name}"].weight_shard == Shard(0, 1)
            assert mods[f"{p}.{name}"].bias is None
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            assert mods[f"{p}.{name}"].style == "rowwise", name
            assert mods[f"{p}.{name}"].weight_shard == Shard(1, 1)
    assert len(a.linears) == 14
    # q, k and v meet in one attention block; gate and up in one MLP block
    sizes = sorted((len(b.columns), len(b.rows)) for b in a.blocks)
    assert sizes == [(2, 1), (2, 1), (3, 1), (3, 1)]
    assert not [r for r in a.rejected if r.kind == "divisibility"]


def test_hf_llama_two_kv_heads_over_four_ranks_is_a_divisibility_rejection(llama):
    a = find_tp_blocks(llama.gm, 4)
    fqn = {n.name: matmul_roles(n)[1].meta.get("autoseqpar", {}).get("fqn", "")
           for n in llama.gm.graph.nodes if n.op == "call_function" and matmul_roles(n)}
    bad = {fqn[r.node].rsplit(".", 1)[0] for r in a.rejected if r.kind == "divisibility"}
    for layer in range(2):
        assert f"model.layers.{layer}.self_attn.k_proj" in bad
        assert f"model.layers.{layer}.self_attn.v_proj" in bad
    assert all(".k_proj" in m or ".v_proj" in m for m in bad)
    # k/v are not sharded; the 4-head query and the MLP still are
    kept = {l.fqn.rsplit(".", 1)[0] for l in a.linears}
    assert not [m for m in kept if m.endswith(("k_proj", "v_proj"))]
    assert "model.layers.0.mlp.gate_proj" in kept and "model.layers.1.mlp.down_proj" in kept


# --------------------------------------------------------------- find_tp_blocks: no match

class _LinearSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)

    def forward(self, x):
        return self.fc(x).sum()


def test_linear_without_row_partner_gives_no_blocks():
    cap = capture(_LinearSum(), (torch.randn(2, 8, 16),))
    a = find_tp_blocks(cap.gm, 2)
    assert a.blocks == () and a.linears == () and a.layouts == {}
    (rej,) = a.rejected
    assert rej.node == "linear" and rej.kind == "mix"
    assert _node(cap.gm, rej.at).target.overloadpacket is aten.sum


class _TwoLinearsWithNorm(nn.Module):
    """fc1 -> LayerNorm over its features -> fc2: the norm needs every feature, no pair."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)))


def test_norm_between_linears_breaks_the_pair():
    cap = capture(_TwoLinearsWithNorm(), (torch.randn(2, 8, 16),))
    a = find_tp_blocks(cap.gm, 2)
    assert a.blocks == ()
    assert {r.node for r in a.rejected} == {"linear", "linear_1"}
    assert all(r.kind == "mix" for r in a.rejected)


# ------------------------------------------------------------------ sequence region

def _residual_adds(gm):
    """aten.add nodes of two (b, s, h) activations (the embedding sum and residual adds)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten.add.Tensor and \
                tuple(n.meta["val"].shape) == (B, S, 32) and \
                all(hasattr(a, "meta") and a.op != "placeholder" for a in n.args[:2]):
            out.append(n)
    return out


def test_nanogpt_sequence_region(nanogpt):
    gm, t = nanogpt.gm, 2
    tp = find_tp_blocks(gm, t)
    labels = find_seq_labels(gm, t, 1)
    region = find_seq_region(gm, tp, labels, t)
    lns = [n.name for n in gm.graph.nodes if is_layer_norm(n)]
    assert len(lns) == 5  # 2 per layer + ln_f
    assert set(lns) <= set(region.layouts)
    assert region.norms == tuple(lns)
    adds = _residual_adds(gm)
    assert len(adds) == 5  # embeddings + 2 residuals per layer
    assert {n.name for n in adds} <= set(region.layouts)
    # disjoint from tensor parallelism
    assert not set(region.layouts) & set(tp.layouts)
    assert all(s == Shard(1, 1, "seq") for s in region.layouts.values())
    # dropouts on the sequence (embedding, residual) are in; attention dropout is not
    assert len(region.dropouts) == 5
    # the tied LM head and everything after stays replicated
    lm_head = list(gm.graph.nodes)[-2]
    assert lm_head.name not in region.layouts and lm_head.name not in tp.layouts


def test_seq_labels_follow_tokens_through_views(nanogpt):
    gm = nanogpt.gm
    labels = find_seq_labels(gm, 2, 1)
    idx = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "idx")
    assert labels[idx] == Shard(1, 1, "seq")
    views = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target is aten.view.default and len(n.meta["val"].shape) == 4]
    assert all(labels[v] == Shard(1, 1, "seq") for v in views)  # (b, s, heads, hd)
    transposes = [u for v in views for u in v.users]
    assert all(labels[u] == Shard(2, 1, "seq") for u in transposes)  # (b, heads, s, hd)


def test_no_row_parallel_output_gives_no_sequence_region():
    cap = capture(_LinearSum(), (torch.randn(2, 8, 16),))
    tp = find_tp_blocks(cap.gm, 2)
    labels = find_seq_labels(cap.gm, 2, 1)
    assert labels  # the tokens are found ...
    region = find_seq_region(cap.gm, tp, labels, 2)
    assert region.layouts == {} and region.norms == () and region.dropouts == ()  # ... unused


def test_no_token_input_gives_no_labels():
    cap = capture(nn.Linear(16, 16), (torch.randn(16),))
    assert find_seq_labels(cap.gm, 2, 1) == {}


# -------------------------------------------------------------------------- plan

def test_plan_without_sequence_parallelism():
    opts = PassOptions(tp=2, group_name="x", sequence_parallel=False)
    gm = _capture_nanogpt().gm  # a fresh graph: split_row_bias_pass edits in place
    gm = split_row_bias_pass(gm, options=opts)  # as in the pipeline: row biases split off first
    plan = plan_layouts(gm, opts)
    assert plan.seq.layouts == {} and plan.seq.norms == ()
    kinds = collections.Counter(tr.kind for tr in plan.transitions)
    assert set(kinds) == {"all_reduce", "copy_to_tp"}
    assert kinds == {"all_reduce": 4, "copy_to_tp": 4}
    rows = {l.node for l in plan.tp.linears if l.style == "rowwise"}
    cols = {l.node for l in plan.tp.linears if l.style == "colwise"}
    assert {tr.producer for tr in plan.transitions if tr.kind == "all_reduce"} == rows
    assert {tr.consumer for tr in plan.transitions if tr.kind == "copy_to_tp"} == cols
    assert all(tr.spec is None for tr in plan.transitions)
    assert all(s.kind == "tp" for s in plan.layouts.values() if isinstance(s, Shard))


def test_plan_with_sequence_parallelism():
    opts = PassOptions(tp=2, group_name="x", sequence_parallel=True)
    gm = _capture_nanogpt().gm  # a fresh graph: split_row_bias_pass edits in place
    gm = split_row_bias_pass(gm, options=opts)
    plan = plan_layouts(gm, opts)
    kinds = collections.Counter(tr.kind for tr in plan.transitions)
    assert kinds["all_reduce"] == 0 and kinds["copy_to_tp"] == 0
    assert kinds["reduce_scatter"] == 4 and kinds["all_gather"] == 4 and kinds["gather"] == 1
    # grad_sync: 5 LayerNorms x (weight, bias) + 4 row biases
    assert kinds["grad_sync"] == 14
    assert {tr.consumer for tr in plan.transitions if tr.kind == "all_gather"} == \
        {l.node for l in plan.tp.linears if l.style == "colwise"}
