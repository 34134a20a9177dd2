"""Each rewrite pass on its own, in one process: a fake process group stands in for the ranks
(structure only: its collectives return garbage), and a real one-rank gloo group checks that
the whole transform computes the original function at t=1."""
import ast
import collections
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import autoseqpar
from autoseqpar.capture import capture
from autoseqpar.pipeline import PASSES, run_passes
from models import NanoGPT, hf_gpt2
from passes.collectives import FUNCTIONS
from passes.layout import Shard, local_shape
from passes.localize import localize_shapes_pass
from passes.match import META, find_tp_blocks
from passes.options import PassOptions
from passes.rng import SEED_PLACEHOLDER
from passes.tensor_parallel import split_row_bias_pass

aten = torch.ops.aten
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASS_NAMES = [p.name for p in PASSES]
SIZE_OPS = (aten.view, aten.reshape, aten._unsafe_view, aten.view_copy, aten.expand)


def _ids(s=8):
    return torch.randint(0, 64, (2, s), generator=torch.Generator().manual_seed(0))


def _nanogpt(**kw):
    torch.manual_seed(0)
    model = NanoGPT(**kw)
    return model, capture(model, (_ids(),))


def _gpt2():
    torch.manual_seed(0)
    model = hf_gpt2()
    ids = _ids()
    return model, capture(model, ((ids,), {"labels": ids.clone()}))


def _upto(name):
    """The pipeline's passes before ``name`` (exclusive)."""
    return PASSES[:PASS_NAMES.index(name)]


def _only(name):
    return PASSES[PASS_NAMES.index(name):PASS_NAMES.index(name) + 1]


def _kinds(gm):
    return collections.Counter(n.meta[META]["kind"] for n in gm.graph.nodes
                               if n.op == "call_function" and "kind" in n.meta.get(META, {}))


def _stamped(gm, pass_name):
    return [n for n in gm.graph.nodes if n.meta.get(META, {}).get("pass") == pass_name]


def _packet(n):
    return getattr(n.target, "overloadpacket", None)


def call_graph(captured, model):
    """Run a captured (unsharded) graph on its example inputs with the model's parameters."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    args = []
    for n in captured.gm.graph.nodes:
        if n.op != "placeholder":
            continue
        meta = n.meta[META]
        kind = meta["kind"]
        args.append(params[meta["fqn"]] if kind == "param" else
                    buffers[meta["fqn"]] if kind == "buffer" else
                    captured.constants[n.name] if kind == "constant" else meta["example"])
    return captured.gm(*args)


class _BiaslessRows(nn.Module):
    """A Megatron MLP pair whose row linear has no bias (and no dropout anywhere)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


# ------------------------------------------------------------------ the whole pipeline

def test_sequence_parallel_collectives(fake_group):
    group = fake_group(2)
    model, cap = _nanogpt()
    gm, log = run_passes(cap.gm, PassOptions(tp=2, group_name=group.group_name))
    assert _kinds(gm) == {"all_gather": 4, "reduce_scatter": 4, "gather": 1, "scatter": 2,
                          "grad_sync": 14}
    for n in gm.graph.nodes:
        kind = n.meta.get(META, {}).get("kind")
        if n.op == "call_function" and kind:
            assert n.target is FUNCTIONS[kind]
            assert group.group_name in n.args
    # a reduce-scatter leaves each rank s/t tokens, an all-gather restores them
    for n in gm.graph.nodes:
        kind = n.meta.get(META, {}).get("kind")
        if kind == "reduce_scatter":
            assert tuple(n.meta["val"].shape) == (2, 4, 32)
        elif kind == "all_gather":
            assert tuple(n.meta["val"].shape) == (2, 8, 32)
    assert [r.name for r in log] == PASS_NAMES


def test_tensor_parallel_only_collectives(fake_group):
    group = fake_group(2)
    model, cap = _nanogpt()
    gm, _ = run_passes(cap.gm, PassOptions(tp=2, group_name=group.group_name,
                                           sequence_parallel=False))
    assert _kinds(gm) == {"all_reduce": 4, "copy_to_tp": 4}
    # without SP every activation outside the blocks keeps the full sequence
    lns = [n for n in gm.graph.nodes if _packet(n) is aten.layer_norm]
    assert all(tuple(n.meta["val"].shape) == (2, 8, 32) for n in lns)


def test_t8_graph_builds_with_one_eighth_shards(fake_group):
    group = fake_group(8)
    model, cap = _nanogpt(n_head=8, n_embd=64)
    gm, _ = run_passes(cap.gm, PassOptions(tp=8, group_name=group.group_name))
    full = dict(model.named_parameters(remove_duplicate=False))
    sharded = [n for n in gm.graph.nodes if n.op == "placeholder" and "shard" in n.meta[META]]
    # 2 layers x (c_attn w, b; c_proj w; c_fc w, b; mlp c_proj w)
    assert len(sharded) == 12
    for n in sharded:
        spec = n.meta[META]["shard"]
        got = list(n.meta["val"].shape)
        want = list(full[n.meta[META]["fqn"]].shape)
        d = spec.dim % len(want)
        assert got[d] * 8 == want[d], n.name
        assert got[:d] + got[d + 1:] == want[:d] + want[d + 1:], n.name
        assert n.meta["val"].numel() * 8 == math.prod(want)
        assert tuple(n.meta[META]["local_shape"]) == tuple(got)
    # replicated parameters are untouched
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.meta[META].get("kind") == "param" and \
                "shard" not in n.meta[META]:
            assert tuple(n.meta["val"].shape) == tuple(full[n.meta[META]["fqn"]].shape)
    # one head per rank: the attention scores are (b, 1, s, s)
    soft = [n for n in gm.graph.nodes if _packet(n) is aten.softmax]
    assert [tuple(n.meta["val"].shape) for n in soft] == [(2, 1, 8, 8)] * 2


# ------------------------------------------------------------------ localize_shapes_pass

def _assert_sizes_agree(gm):
    checked = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and _packet(n) in SIZE_OPS:
            size, val = list(n.args[1]), list(n.meta["val"].shape)
            assert len(size) == len(val), n.name
            assert all(s in (-1, v) for s, v in zip(size, val)), (n.name, size, val)
            checked += 1
        elif n.op == "call_function" and _packet(n) in (aten.split, aten.split_with_sizes):
            sizes = n.args[1]
            outs = [o.shape[n.args[2] if len(n.args) > 2 else 0] for o in n.meta["val"]]
            if isinstance(sizes, int):
                assert all(o <= sizes for o in outs) and outs[0] == sizes, (n.name, sizes, outs)
            else:
                assert list(sizes) == outs, n.name
            checked += 1
    return checked


@pytest.mark.parametrize("model_name,t,sp", [("nanogpt", 2, True), ("nanogpt", 2, False),
                                             ("nanogpt", 4, True), ("gpt2", 2, True)])
def test_localize_leaves_no_view_disagreeing_with_meta(fake_group, model_name, t, sp):
    group = fake_group(t)
    model, cap = _nanogpt() if model_name == "nanogpt" else _gpt2()
    # the pipeline ends with propagate_local_shapes_pass, which raises on a wrong size
    gm, _ = run_passes(cap.gm, PassOptions(tp=t, group_name=group.group_name,
                                           sequence_parallel=sp))
    assert _assert_sizes_agree(gm) > 0
    # something was actually localized: a head split of 4 heads over t ranks
    heads = [list(n.args[1]) for n in gm.graph.nodes if _packet(n) is aten.view
             and len(n.args[1]) == 4]
    assert heads and all(h[2] == 4 // t for h in heads)


def test_localize_rewrites_exactly_the_sharded_sizes(fake_group):
    group = fake_group(2)
    opts = PassOptions(tp=2, group_name=group.group_name)
    model, cap = _nanogpt()
    gm, _ = run_passes(cap.gm, opts, _upto("localize_shapes_pass"))
    before = {n.name: tuple(n.args) for n in gm.graph.nodes if n.op == "call_function"}
    gm = localize_shapes_pass(gm, options=opts)
    changed = unchanged = 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        layout = n.meta[META].get("layout")
        if _packet(n) in SIZE_OPS and isinstance(layout, Shard):
            # match: a sharded view gets the per-rank size of its global meta shape
            assert list(n.args[1]) == local_shape(n.meta["val"].shape, layout, 2)
            changed += tuple(n.args) != before[n.name]
        elif _packet(n) in (aten.split, aten.split_with_sizes):
            src = n.args[0].meta[META].get("layout")
            if isinstance(src, Shard):
                assert n.args[1] == before[n.name][1] // 2  # 32 -> 16 per q/k/v
                changed += 1
        else:
            # no match: every other node keeps its arguments
            assert tuple(n.args) == before[n.name], n.name
            unchanged += 1
    assert changed == 2 * (3 + 1 + 1)  # per layer: q/k/v head views, merge view, qkv split
    assert unchanged > 0


# ---------------------------------------------------------------- split_row_bias_pass

def test_split_row_bias_on_nanogpt():
    model, cap = _nanogpt()
    (ref,) = call_graph(cap, model)
    rows = [l.node for l in find_tp_blocks(cap.gm, 2).linears if l.style == "rowwise"]
    assert len(rows) == 4
    biased = lambda gm: [n for n in gm.graph.nodes if _packet(n) is aten.linear and  # noqa: E731
                         len(n.args) > 2 and n.args[2] is not None]
    assert len(biased(cap.gm)) == 8
    adds_before = sum(_packet(n) is aten.add for n in cap.gm.graph.nodes)
    gm = split_row_bias_pass(cap.gm, options=PassOptions(tp=2, group_name="unused"))
    names = {n.name for n in gm.graph.nodes}
    assert not set(rows) & names  # every row linear-with-bias is gone ...
    assert len(biased(gm)) == 4  # ... the columns keep theirs
    made = _stamped(gm, "split_row_bias_pass")
    assert len(made) == 8 and {n.meta[META]["source"] for n in made} == set(rows)
    adds = [n for n in made if _packet(n) is aten.add]
    assert len(adds) == 4
    for add in adds:
        mm, bias = add.args
        assert _packet(mm) is aten.linear and len(mm.args) == 2  # linear without bias
        assert bias.op == "placeholder" and bias.meta[META]["fqn"].endswith("c_proj.bias")
    assert sum(_packet(n) is aten.add for n in gm.graph.nodes) == adds_before + 4
    # the same function
    (got,) = call_graph(cap, model)
    torch.testing.assert_close(got, ref)
    # after the pass the analysis sees row linears without bias
    assert all(l.bias is None for l in find_tp_blocks(gm, 2).linears if l.style == "rowwise")


def test_split_row_bias_on_conv1d_addmm():
    model, cap = _gpt2()
    ref = call_graph(cap, model)
    assert sum(_packet(n) is aten.addmm for n in cap.gm.graph.nodes) == 8
    gm = split_row_bias_pass(cap.gm, options=PassOptions(tp=2, group_name="unused"))
    assert sum(_packet(n) is aten.addmm for n in gm.graph.nodes) == 4  # the columns
    mms = [n for n in gm.graph.nodes if _packet(n) is aten.mm]
    assert len(mms) == 4
    assert all(n.meta[META]["pass"] == "split_row_bias_pass" for n in mms)
    got = call_graph(cap, model)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_split_row_bias_leaves_biasless_rows_alone():
    cap = capture(_BiaslessRows(), (torch.randn(2, 8, 16),))
    a = find_tp_blocks(cap.gm, 2)
    # the pair is found (so this is a no-match on the bias, not on the structure)
    assert [(l.style, l.bias is None) for l in a.linears] == [("colwise", False),
                                                              ("rowwise", True)]
    code = cap.gm.code
    gm = split_row_bias_pass(cap.gm, options=PassOptions(tp=2, group_name="unused"))
    assert gm.code == code
    assert _stamped(gm, "split_row_bias_pass") == []


# ---------------------------------------------------- the insertion passes, one at a time

@pytest.mark.parametrize("pass_name,sp,expected", [
    ("insert_tensor_parallel_collectives_pass", False, {"all_reduce": 4, "copy_to_tp": 4}),
    ("insert_tensor_parallel_collectives_pass", True, {}),
    ("insert_sequence_parallel_collectives_pass", True,
     {"reduce_scatter": 4, "all_gather": 4, "gather": 1, "scatter": 2}),
    ("insert_sequence_parallel_collectives_pass", False, {}),
    ("sync_replicated_grads_pass", True, {"grad_sync": 14}),
    ("sync_replicated_grads_pass", False, {}),
])
def test_insertion_pass_alone(fake_group, pass_name, sp, expected):
    group = fake_group(2)
    opts = PassOptions(tp=2, group_name=group.group_name, sequence_parallel=sp)
    model, cap = _nanogpt()
    prefix = [p for p in _upto("insert_tensor_parallel_collectives_pass")]
    gm, _ = run_passes(cap.gm, opts, tuple(prefix))
    assert _kinds(gm) == {}
    gm, _ = run_passes(gm, opts, _only(pass_name))
    assert _kinds(gm) == expected
    assert len(_stamped(gm, pass_name)) == sum(expected.values())


def test_grad_sync_wraps_norm_weights_and_row_biases(fake_group):
    group = fake_group(2)
    model, cap = _nanogpt()
    gm, _ = run_passes(cap.gm, PassOptions(tp=2, group_name=group.group_name))
    synced = {n.args[0].meta[META]["fqn"] for n in gm.graph.nodes
              if n.meta.get(META, {}).get("kind") == "grad_sync"}
    lns = {f"{m}.{w}" for m in ("h.0.ln_1", "h.0.ln_2", "h.1.ln_1", "h.1.ln_2", "ln_f")
           for w in ("weight", "bias")}
    rows = {f"h.{i}.{m}.c_proj.bias" for i in range(2) for m in ("attn", "mlp")}
    assert synced == lns | rows


# ---------------------------------------------------------------- fork_dropout_rng_pass

def _dropout_streams(gm):
    """{stream index: number of dropout masks drawn from it} (0: per rank, 1: group-wide)."""
    (seeds,) = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name == SEED_PLACEHOLDER]
    assert seeds.meta[META]["kind"] == "seeds"
    masks = [n for n in gm.graph.nodes if n.target is torch.ops.autoseqpar.dropout_mask.default]
    streams = collections.Counter()
    for m in masks:
        sel = m.args[2]
        assert sel.target is aten.select.int and sel.args[0] is seeds
        streams[sel.args[2]] += 1
    assert not [n for n in gm.graph.nodes if _packet(n) is aten.dropout]  # all rewritten
    return streams


@pytest.mark.parametrize("sp,expected", [
    (False, {0: 2, 1: 5}),  # only the attention dropouts (on head shards) are per rank
    (True, {0: 7}),  # embedding / residual dropouts now run on sequence shards too
])
def test_fork_dropout_rng_picks_the_stream_by_layout(fake_group, sp, expected):
    group = fake_group(2)
    model, cap = _nanogpt(dropout=0.1)
    gm, _ = run_passes(cap.gm, PassOptions(tp=2, group_name=group.group_name,
                                           sequence_parallel=sp))
    assert _dropout_streams(gm) == expected
    masks = [n for n in gm.graph.nodes if n.target is torch.ops.autoseqpar.dropout_mask.default]
    per_rank = [m for m in masks if m.args[2].args[2] == 0]
    assert sum(_packet(m.args[0]) is aten.softmax for m in per_rank) == 2
    assert len({m.args[3] for m in masks}) == len(masks)  # one site per dropout


def test_fork_dropout_rng_no_match_without_live_dropout(fake_group):
    group = fake_group(2)
    for model, x in ((_BiaslessRows(), torch.randn(2, 8, 16)), (NanoGPT(dropout=0.0), _ids())):
        cap = capture(model, (x,))
        gm, _ = run_passes(cap.gm, PassOptions(tp=2, group_name=group.group_name))
        assert not [n for n in gm.graph.nodes
                    if n.op == "placeholder" and n.name == SEED_PLACEHOLDER]
        assert not [n for n in gm.graph.nodes
                    if n.target is torch.ops.autoseqpar.dropout_mask.default]
        assert not [n for n in gm.graph.nodes if _packet(n) is aten.dropout]  # p=0: identity


# ------------------------------------------------------------------- import direction

def test_passes_do_not_import_autoseqpar():
    folder = os.path.join(ROOT, "passes")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    assert "propagate.py" in files
    for f in files:
        tree = ast.parse(open(os.path.join(folder, f)).read(), f)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            assert not [m for m in names if m == "autoseqpar" or m.startswith("autoseqpar.")], \
                f"passes/{f}:{node.lineno} imports {names}"


# ------------------------------------------------------- t=1 on a real one-rank group

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_one_rank():
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{_free_port()}")
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("sp", [True, False])
def test_t1_transform_is_the_original_function(gloo_one_rank, sp):
    torch.manual_seed(0)
    model = NanoGPT()
    ids = _ids()
    targets = ids.roll(-1, 1)
    ref_logits, ref_loss = model(ids, targets)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    pm = autoseqpar.transform(model, ((ids, targets), {}), sequence_parallel=sp)
    assert pm.tp == 1
    kinds = _kinds(pm._gm)
    assert kinds["reduce_scatter" if sp else "all_reduce"] == 4
    logits, loss = pm(ids, targets)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    grads = pm.gather_grads()
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, msg=name)
    # the user's model is untouched
    assert all(p.grad is None for p in model.parameters())
