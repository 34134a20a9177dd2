"""Analyses: find the Megatron structure in an aten graph. Nothing here changes the graph.

* :func:`find_tp_blocks` -- column-parallel linears, the head-sharded attention core and
  activations between them, and the row-parallel linears that close them, found by carrying a
  ``Shard`` on each candidate column's output features through the graph
  (:mod:`passes.propagate`). A candidate whose shard escapes (reaches an op that mixes the
  sharded features, the graph output, a shared weight) is dropped and the search repeats, so
  what remains is exactly the set of linears that can be split without changing the function.
* :func:`find_seq_labels` -- which dimension of each value is the token (sequence) dimension,
  carried from the token inputs for as long as ops act on each token independently.
* :func:`find_seq_region` -- the sequence-local values between row-parallel outputs and the
  next column-parallel inputs (norms, dropout, residual and bias adds, elementwise ops), grown
  from the row outputs forward and backward.

Placeholders must carry ``meta["autoseqpar"]["kind"]`` in ``{"param", "buffer", "input"}``.
"""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from .layout import Partial, Shard
from .propagate import (NoRule, matmul_roles, propagate, shape_of, tensor_operands)

aten = torch.ops.aten
META = "autoseqpar"


# ------------------------------------------------------------------- predicates

def placeholder_kind(n) -> Optional[str]:
    if isinstance(n, fx.Node) and n.op == "placeholder":
        return n.meta.get(META, {}).get("kind")
    return None


def is_param(n) -> bool:
    return placeholder_kind(n) == "param"


def is_linear(n: fx.Node) -> bool:
    """A matmul whose weight is a 2-D parameter used by this node alone."""
    roles = n.op == "call_function" and matmul_roles(n)
    if not roles:
        return False
    w = roles[1]
    return (is_param(w) and len(shape_of(w)) == 2 and len(w.users) == 1
            and not w.meta[META].get("tied"))


def linear_bias(n: fx.Node) -> Optional[fx.Node]:
    p = getattr(n.target, "overloadpacket", None)
    if p is aten.linear and len(n.args) > 2 and n.args[2] is not None:
        return n.args[2]
    if p is aten.addmm:
        return n.args[0]
    return None


def is_layer_norm(n: fx.Node) -> bool:
    return n.op == "call_function" and getattr(n.target, "overloadpacket", None) in (
        aten.layer_norm, aten.native_layer_norm, aten.rms_norm)


def is_rms_norm_rsqrt(n: fx.Node) -> bool:
    """The rsqrt of an RMSNorm written as pow/mean/add/rsqrt (HF Llama)."""
    return n.op == "call_function" and getattr(n.target, "overloadpacket", None) is aten.rsqrt


def is_dropout(n: fx.Node) -> bool:
    return n.op == "call_function" and getattr(n.target, "overloadpacket", None) in (
        aten.dropout, aten.native_dropout, aten.dropout_)


def is_attention(n: fx.Node) -> bool:
    p = getattr(n.target, "overloadpacket", None)
    return n.op == "call_function" and p in (
        aten.scaled_dot_product_attention, aten._softmax, aten.softmax)


def param_fqn(n) -> Optional[str]:
    return n.meta.get(META, {}).get("fqn") if isinstance(n, fx.Node) else None


def module_path(n: fx.Node) -> str:
    """The module path of a linear's weight, else the innermost module that made the node."""
    roles = n.op == "call_function" and matmul_roles(n)
    if roles and param_fqn(roles[1]):
        return param_fqn(roles[1]).rsplit(".", 1)[0]
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        path = path.replace("L['self'].", "").replace("L__self___", "")
        return re.sub(r"\[(\d+)\]", r".\1", path)  # dynamo's "h[0]" is the module path "h.0"
    return ""


# --------------------------------------------------------------------- matches

@dataclass(frozen=True)
class TPLinear:
    node: str
    weight: str  # placeholder name
    fqn: str  # the weight parameter's name in the user's model
    style: str  # "colwise" | "rowwise"
    weight_shard: Shard
    bias: Optional[str] = None
    bias_shard: Optional[Shard] = None


@dataclass(frozen=True)
class TPBlock:
    """Column linears, the sharded values between them, and the row linears closing them."""
    columns: tuple[TPLinear, ...]
    rows: tuple[TPLinear, ...]
    attention: tuple[str, ...]  # attention cores (sdpa / softmax) sharded by heads
    nodes: tuple[str, ...]  # every node whose output is sharded by heads / features


@dataclass(frozen=True)
class Rejection:
    node: str  # the column linear that could not be split
    at: str  # the node where its shard escaped
    reason: str
    kind: str


@dataclass(frozen=True)
class TPAnalysis:
    blocks: tuple[TPBlock, ...]
    layouts: dict  # node name -> Shard | Partial for every tensor-parallel value
    rejected: tuple[Rejection, ...]

    @property
    def linears(self) -> tuple[TPLinear, ...]:
        return tuple(l for b in self.blocks for l in (*b.columns, *b.rows))


@dataclass(frozen=True)
class SeqRegion:
    """Values computed on sequence shards, with the dimension that holds the tokens."""
    layouts: dict  # node name -> Shard(kind="seq")
    norms: tuple[str, ...]
    dropouts: tuple[str, ...]
    # norms and dropouts left replicated: (node, module path, why)
    replicated: tuple[tuple[str, str, str], ...] = ()


# ------------------------------------------------------------- tensor parallel

class _Order:
    def __init__(self, gm: fx.GraphModule):
        self.index = {n: i for i, n in enumerate(gm.graph.nodes)}


def _run_tp(gm, order: _Order, columns: dict, t: int):
    """Carry column shards forward. ``columns`` maps candidate linears to their blocks; one
    becomes a column root when reached (in graph order) with an unsharded input -- a candidate
    fed by an earlier column's shard is that block's row instead.

    Returns (specs, origin, rows, failures, roots): specs maps each sharded node to its layout,
    origin maps it to the roots it came from, rows maps row linears to blocks, failures lists
    (node, NoRule, roots)."""
    specs: dict = {}
    origin: dict = {}
    rows: dict = {}
    roots: dict = {}
    failures: list = []
    heap: list = []
    queued: set = set()

    def push(n):
        if n not in queued:
            queued.add(n)
            heapq.heappush(heap, (order.index[n], n.name, n))

    for c in columns:
        push(c)
    while heap:
        _, _, n = heapq.heappop(heap)
        ins = [a for a in n.all_input_nodes if a in specs]
        if n in columns and not ins:
            roles = matmul_roles(n)
            specs[n] = Shard(len(shape_of(n)) - 1, columns[n])
            specs[roles[1]] = Shard(roles[3], columns[n])
            origin[n] = frozenset([n])
            roots[n] = columns[n]
            for u in n.users:
                push(u)
            continue
        if not ins:
            continue
        org = frozenset().union(*(origin[a] for a in ins if a in origin))
        if n.op == "output":
            if any(isinstance(specs[a], Shard) for a in ins):
                failures.append((n, NoRule("a sharded value is a graph output", "mix"), org))
            continue
        local = specs
        if is_linear(n):
            x, w, w_in, _ = matmul_roles(n)
            sx = specs.get(x)
            if isinstance(sx, Shard) and sx.dim % len(shape_of(x)) == len(shape_of(x)) - 1:
                local = dict(specs)
                local[w] = Shard(w_in, sx.blocks)
                rows[n] = sx.blocks
        try:
            prop = propagate(n, local, t)
        except NoRule as e:
            if all(isinstance(specs[a], Partial) for a in ins):
                continue  # a reduction point: the output is replicated
            failures.append((n, e, org))
            continue
        if not isinstance(prop.out, (Shard, Partial, tuple)):
            continue
        if n in rows:
            specs[matmul_roles(n)[1]] = local[matmul_roles(n)[1]]
        specs[n] = prop.out
        origin[n] = org
        for u in n.users:
            push(u)
    return specs, origin, rows, failures, roots


def _choose_blocks(gm, order, root, t) -> tuple[int, Optional[tuple]]:
    """The fewest blocks that let this column's shard through reshapes and splits."""
    width = shape_of(root)[-1]
    tried, first_failure, need_tried = [], None, None
    cand = [1]
    while cand:
        b = cand.pop(0)
        if b in tried or width % (b * t):
            continue
        tried.append(b)
        _, _, _, failures, _ = _run_tp(gm, order, {root: b}, t)
        shape_fail = [f for f in failures if f[1].kind in ("blocks", "divisibility")]
        # plain shards are kept unless a reshape or split refuses them; blocks only if they
        # carry the shard through everything (not, say, into a head's features)
        if (b == 1 and not shape_fail) or not failures:
            return b, None
        # report the most refined attempt: the blocks a split asked for, else plain shards
        if first_failure is None or b == need_tried:
            first_failure = shape_fail[0]
        for f in shape_fail:
            if f[1].kind == "blocks" and f[1].need and f[1].need not in tried:
                need_tried = f[1].need
                cand.insert(0, f[1].need)
        if len(tried) == 1:
            cand.extend(k for k in (2, 3, 4, 6, 8) if k not in cand)
    return 1, first_failure


def find_tp_blocks(gm: fx.GraphModule, t: int) -> TPAnalysis:
    """Find the column/row-parallel linears of ``gm`` for tensor-parallel degree ``t``."""
    order = _Order(gm)
    candidates = [n for n in gm.graph.nodes if is_linear(n)]
    blocks_of, rejected = {}, []
    for c in candidates:
        b, fail = _choose_blocks(gm, order, c, t)
        blocks_of[c] = b
        if fail is not None:
            rejected.append(Rejection(c.name, fail[0].name, fail[1].reason, fail[1].kind))
    dropped = set(c for c in candidates if any(r.node == c.name for r in rejected))
    while True:
        columns = {c: blocks_of[c] for c in candidates if c not in dropped}
        specs, origin, rows, failures, roots = _run_tp(gm, order, columns, t)
        if not failures:
            break
        for n, e, org in failures:
            for r in org:
                if r not in dropped:
                    dropped.add(r)
                    rejected.append(Rejection(r.name, n.name, e.reason, e.kind))
    return _collect(specs, origin, rows, roots, rejected, order)


def _collect(specs, origin, rows, roots, rejected, order) -> TPAnalysis:
    layouts = {n.name: s for n, s in specs.items() if n.op != "placeholder"}
    parent: dict = {}  # union-find over roots: roots whose shards meet form one block

    def find(x):
        while parent.get(x, x) is not x:
            x = parent[x]
        return x
    for org in origin.values():
        org = sorted(org, key=order.index.get)
        for r in org[1:]:
            parent[find(r)] = find(org[0])
    by_root: dict = {}
    for n in sorted(origin, key=order.index.get):
        if n.op != "placeholder":
            by_root.setdefault(find(next(iter(origin[n]))), []).append(n)
    blocks = []
    for root in sorted(by_root, key=order.index.get):
        nodes = by_root[root]
        blocks.append(TPBlock(
            tuple(_tp_linear(n, "colwise", specs) for n in nodes if n in roots),
            tuple(_tp_linear(n, "rowwise", specs) for n in nodes if n in rows),
            tuple(n.name for n in nodes if is_attention(n)),
            tuple(n.name for n in nodes)))
    return TPAnalysis(tuple(blocks), layouts, tuple(rejected))


def _tp_linear(n, style, specs) -> TPLinear:
    x, w, w_in, w_out = matmul_roles(n)
    bias = linear_bias(n)
    bias_shard = None
    if bias is not None and style == "colwise":
        bias_shard = Shard(0, specs[w].blocks)
    return TPLinear(n.name, w.name, param_fqn(w) or w.name, style, specs[w],
                    bias.name if bias is not None else None, bias_shard)


# ------------------------------------------------------------ sequence labels

def find_seq_labels(gm: fx.GraphModule, t: int, seq_dim: int = 1) -> dict:
    """Node -> Shard(kind="seq"): which dimension of each value indexes the (query) tokens,
    carried from the token inputs (user inputs of rank >= 2 with the sequence length at
    ``seq_dim``). Where an op combines two token-carrying operands (attention scores and
    probabilities), the first operand's token dimension is followed, so values after the
    attention core are labelled too; whether an op acts per token is :func:`is_per_token`."""
    inputs = [n for n in gm.graph.nodes if placeholder_kind(n) == "input"
              and len(shape_of(n)) > seq_dim]
    if not inputs:
        return {}
    s = shape_of(inputs[0])[seq_dim]
    labels: dict = {n: Shard(seq_dim, 1, "seq") for n in inputs if shape_of(n)[seq_dim] == s}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n in labels:
            continue
        labelled = [a for a in n.all_input_nodes if a in labels]
        if not labelled:
            continue
        for specs in ({a: labels[a] for a in labelled}, {labelled[0]: labels[labelled[0]]}):
            try:
                prop = propagate(n, specs, t)
            except NoRule:
                continue
            if isinstance(prop.out, (Shard, tuple)):
                labels[n] = prop.out
            break
        else:
            q = n.args[0] if n.args else None
            if getattr(n.target, "overloadpacket", None) is aten.scaled_dot_product_attention \
                    and q in labels:
                labels[n] = labels[q]  # one output row per query token
    return labels


def is_per_token(n: fx.Node, labels: dict, t: int) -> bool:
    """True if ``n`` acts on each token independently: its output's token dimension follows
    from all its token-carrying operands' under the sharding rules."""
    if n.op != "call_function" or n not in labels:
        return False
    try:
        prop = propagate(n, {a: labels[a] for a in n.all_input_nodes if a in labels}, t)
    except NoRule:
        return False
    return prop.out == labels[n]


def _big_param_operand(n: fx.Node) -> bool:
    """Embedding tables and replicated weight matrices stop the sequence region: summing their
    gradients over the group would cost more than gathering the activation."""
    return any(is_param(a) and len(shape_of(a)) >= 2 for a in tensor_operands(n))


def find_seq_region(gm: fx.GraphModule, tp: TPAnalysis, labels: dict, t: int) -> SeqRegion:
    """The sequence-sharded values. Seeds: the per-token consumers of row-parallel outputs
    (where the reduce-scatter goes). Grown forward to per-token consumers, and backward to
    per-token producers all of whose consumers are per-token or column-parallel inputs; a
    producer that cannot join (the embedding lookup, a large parameter) enters the region by a
    free slice, and so may its other per-token consumers -- the first LayerNorm runs on shards,
    as in Megatron."""
    tp_nodes = tp.layouts
    col_names = {l.node for b in tp.blocks for l in b.columns}
    cols = {n for n in gm.graph.nodes if n.name in col_names}
    col_inputs = {matmul_roles(n)[0] for n in cols}
    ok = {n for n in gm.graph.nodes if n.name not in tp_nodes and not _big_param_operand(n)
          and is_per_token(n, labels, t)}
    seq: dict = {}
    work = [u for n in gm.graph.nodes if isinstance(tp_nodes.get(n.name), Partial)
            for u in n.users if u in ok]
    while work:
        n = work.pop()
        if n in seq:
            continue
        seq[n] = labels[n]
        work.extend(u for u in n.users if u in ok and u not in seq)
        for a in n.all_input_nodes:
            if a in ok and a not in seq and all(
                    u in ok or (u in cols and a in col_inputs) or is_metadata_check(u)
                    for u in a.users):
                work.append(a)
            elif a not in ok and a in labels and a.name not in tp_nodes:
                # a replicated producer (the embedding) enters the region by a free slice:
                # its other per-token consumers (the first norm) may take the slice as well
                work.extend(u for u in a.users if u in ok and u not in seq)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = sorted(seq, key=order.get)
    left = tuple((n.name, module_path(n), _why_replicated(n, ok, tp_nodes, labels, t))
                 for n in gm.graph.nodes
                 if n not in seq and n.name not in tp_nodes
                 and (_is_norm(n) or is_dropout(n)))
    return SeqRegion({n.name: seq[n] for n in nodes},
                     tuple(n.name for n in nodes if _is_norm(n)),
                     tuple(n.name for n in nodes if is_dropout(n)), left)


def _is_norm(n: fx.Node) -> bool:
    return is_layer_norm(n) or is_rms_norm_rsqrt(n)


def is_metadata_check(n: fx.Node) -> bool:
    """A check of dtype/device that produces nothing (export's ``_assert_tensor_metadata``):
    it reads no values, so it never keeps a producer whole, needs no layout, and may be
    dropped when what it checks is dead."""
    return n.op == "call_function" and n.target is aten._assert_tensor_metadata.default


def _why_replicated(n: fx.Node, ok: set, tp_nodes: dict, labels: dict, t: int) -> str:
    """Why a norm or dropout outside the sequence region was not put in it."""
    if n not in labels:
        src = next((a for a in n.all_input_nodes if a in labels), None)
        if src is not None:
            return (f"it mixes tokens: its input {src.name} has the token dimension, its "
                    "output does not")
        return "no token dimension found in its value"
    if not is_per_token(n, labels, t):
        return "it mixes tokens (no sharding rule keeps the token dimension)"
    if _big_param_operand(n):
        return "it uses a large replicated parameter"
    bad = [u for u in n.users
           if u not in ok and u.name not in tp_nodes and not is_metadata_check(u)]
    if bad:
        return (f"its output feeds {bad[0].name} ({getattr(bad[0].target, '__name__', bad[0].target)}),"
                " which is not per-token")
    for a in n.all_input_nodes:
        other = [u for u in a.users
                 if u not in ok and u.name not in tp_nodes and not is_metadata_check(u)]
        if a in labels and other:
            return (f"its input {a.name} also feeds {other[0].name} "
                    f"({getattr(other[0].target, '__name__', other[0].target)}), which is not "
                    "per-token, so the input stays whole")
    return "no row-parallel output reaches it"


@dataclass(frozen=True)
class AttentionCore:
    nodes: tuple[str, ...]  # QK^T ... .V, graph order
    output: str  # the last node (.V or the fused attention): its value feeds the projection


def find_attention_cores(gm: fx.GraphModule, tp: TPAnalysis) -> tuple[AttentionCore, ...]:
    """Per TP block, the attention core the paper recomputes (QK^T, softmax, dropout, .V): the
    nodes on paths from the block's first matmul of two activations (or its fused attention op)
    to its last one, inclusive. Paths are followed in the graph as it is now, so nodes later
    passes put in between (dropout masks) belong to the core too."""
    nodes = {n.name: n for n in gm.graph.nodes}
    cores = []
    for b in tp.blocks:
        anchors = [nodes[x] for x in b.nodes if x in nodes and (
            _is_activation_matmul(nodes[x]) or getattr(nodes[x].target, "overloadpacket", None)
            is aten.scaled_dot_product_attention)]
        if not anchors:
            continue
        down: set = set()
        stack = [anchors[0]]
        while stack:
            n = stack.pop()
            if n not in down:
                down.add(n)
                stack.extend(n.users)
        up: set = set()
        stack = [anchors[-1]]
        while stack:
            n = stack.pop()
            if n not in up and n in down:
                up.add(n)
                stack.extend(n.all_input_nodes)
        cores.append(AttentionCore(tuple(n.name for n in gm.graph.nodes if n in up),
                                   anchors[-1].name))
    return tuple(cores)


def _is_activation_matmul(n: fx.Node) -> bool:
    p = getattr(n.target, "overloadpacket", None)
    if p not in (aten.matmul, aten.bmm, aten.mm):
        return False
    return all(a.op != "placeholder" for a in n.args[:2] if isinstance(a, fx.Node))


__all__ = ["TPLinear", "TPBlock", "TPAnalysis", "Rejection", "SeqRegion", "find_tp_blocks",
           "find_seq_labels", "find_seq_region", "find_attention_cores", "AttentionCore", "is_linear", "is_layer_norm", "is_dropout",
           "is_attention", "is_param", "placeholder_kind", "param_fqn", "module_path", "META",
           "linear_bias", "is_metadata_check"]
