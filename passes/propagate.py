"""Sharding propagation: how a ``Shard`` on an op's inputs carries to its output.

One rule per aten op family, written on global shapes (``node.meta["val"]``). A rule either
returns a :class:`Propagation` (the output layout, which replicated operands must be sliced to
match, which replicated operands are broadcast across the shard) or raises :class:`NoRule`
saying why the op cannot act shard by shard (it mixes the sharded dimension, or a reshape cannot
keep ``t`` contiguous pieces).

The same rules serve two analyses: tensor parallelism (a ``Shard`` on a column-parallel output's
feature dimension is carried through heads and activations to a row-parallel input) and sequence
parallelism (a ``Shard`` on the token dimension of the inputs is carried as far as ops act on each
token independently). Nothing here changes a graph.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from .layout import PARTIAL, REPLICATE, Partial, Shard

aten = torch.ops.aten


class NoRule(Exception):
    """The op cannot act on its inputs shard by shard. ``kind`` is ``"mix"`` (the op combines
    elements across the sharded dimension), ``"divisibility"`` (a reshape cannot keep ``t``
    contiguous pieces), ``"blocks"`` (a split needs finer blocks: ``need`` of them) or
    ``"unsupported"`` (no rule for the op)."""

    def __init__(self, reason: str, kind: str = "unsupported", need: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.need = need


@dataclass(frozen=True)
class Propagation:
    out: object  # Layout, a tuple of Layouts for multi-output ops, or None (no tensor output)
    slices: dict = field(default_factory=dict)  # replicated operand Node -> Shard it must be cut to
    broadcast: tuple = ()  # replicated operand Nodes broadcast over the shard


def shape_of(n) -> tuple:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def is_tensor_node(a) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


def tensor_operands(node: fx.Node) -> list[fx.Node]:
    """Tensor-valued Node operands in argument order (lists flattened), without repeats."""
    seen: dict[fx.Node, None] = {}
    for a in _flat(node):
        if is_tensor_node(a):
            seen.setdefault(a, None)
    return list(seen)


def _flat(node: fx.Node):
    out: list = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


def _norm(d: int, nd: int) -> int:
    return d % nd if nd else 0


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None)


# ---------------------------------------------------------------- generic rules


def _elementwise(node, specs, t) -> Propagation:
    out_shape = shape_of(node)
    nd = len(out_shape)
    placed: Optional[Shard] = None
    for a in tensor_operands(node):
        s = specs.get(a)
        if isinstance(s, Shard):
            d = _norm(s.dim, len(shape_of(a))) + nd - len(shape_of(a))
            cand = Shard(d, s.blocks, s.kind)
            if placed is not None and placed != cand:
                raise NoRule(f"operands sharded differently ({placed} vs {cand})", "mix")
            placed = cand
        elif isinstance(s, Partial):
            raise NoRule("partial operand", "mix")
    assert placed is not None
    slices, bcast = {}, []
    for a in tensor_operands(node):
        if a in specs:
            continue
        ash = shape_of(a)
        k = placed.dim - (nd - len(ash))
        if k < 0 or ash[k] == 1:
            bcast.append(a)
        else:
            slices[a] = Shard(k, placed.blocks, placed.kind)
    out = placed
    if _packet(node) is aten.native_dropout:
        out = (placed, placed)
    return Propagation(out, slices, tuple(bcast))


def _groups(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]]:
    """Group dims of two shapes with equal element count into runs of equal product."""
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        gi, gj, pi, pj = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(a):
                pi *= a[i]; gi.append(i); i += 1
            elif j < len(b):
                pj *= b[j]; gj.append(j); j += 1
            else:
                break
        groups.append((gi, gj))
    if groups:
        groups[-1][0].extend(range(i, len(a)))
        groups[-1][1].extend(range(j, len(b)))
    return groups


def reshape_spec(in_shape: tuple, out_shape: tuple, s: Shard, t: int) -> Shard:
    """Where a shard of ``in_shape`` lands after a reshape to ``out_shape`` (see module doc)."""
    d = _norm(s.dim, len(in_shape))
    n = in_shape[d]
    if n % (s.blocks * t):
        raise NoRule(f"dimension of size {n} does not split into {s.blocks}x{t}", "divisibility")
    for gi, gj in _groups(in_shape, out_shape):
        if d not in gi:
            continue
        outer = math.prod(in_shape[gi[0]:d])
        inner = math.prod(in_shape[d + 1:gi[-1] + 1])
        big_b, chunk = outer * s.blocks, (n // (s.blocks * t)) * inner
        for k in gj:
            p_out = math.prod(out_shape[gj[0]:k])
            q_in = math.prod(out_shape[k + 1:gj[-1] + 1])
            if big_b % p_out == 0 and chunk % q_in == 0 and \
                    out_shape[k] == (big_b // p_out) * t * (chunk // q_in):
                return Shard(k, big_b // p_out, s.kind)
        sizes = [out_shape[k] for k in gj]
        lead = next((x for x in sizes if x > 1), sizes[0])
        raise NoRule(f"its {n} features are viewed as {sizes}, and {lead} (the heads) is not "
                     f"divisible by {t}", "divisibility")
    raise NoRule("reshape lost the sharded dimension", "unsupported")


def _single_input(node, specs) -> tuple[fx.Node, Shard]:
    src = node.args[0]
    s = specs.get(src)
    if not isinstance(s, Shard):
        raise NoRule("sharded operand is not the first argument", "unsupported")
    for a in tensor_operands(node)[1:]:
        if isinstance(specs.get(a), (Shard, Partial)):
            raise NoRule("several sharded operands", "unsupported")
    return src, s


def _reshape(node, specs, t) -> Propagation:
    src, s = _single_input(node, specs)
    return Propagation(reshape_spec(shape_of(src), shape_of(node), s, t))


def _expand(node, specs, t) -> Propagation:
    src, s = _single_input(node, specs)
    ish, osh = shape_of(src), shape_of(node)
    d = _norm(s.dim, len(ish))
    d2 = d + len(osh) - len(ish)
    if osh[d2] != ish[d]:
        raise NoRule("expand of the sharded dimension", "mix")
    return Propagation(Shard(d2, s.blocks, s.kind))


def _permute_like(node, specs, t) -> Propagation:
    src, s = _single_input(node, specs)
    nd = len(shape_of(src))
    d = _norm(s.dim, nd)
    p = _packet(node)
    if p is aten.t:
        perm = list(range(nd))[::-1]
    elif p is aten.permute:
        perm = [_norm(x, nd) for x in node.args[1]]
    else:  # transpose
        i, j = _norm(node.args[1], nd), _norm(node.args[2], nd)
        perm = list(range(nd))
        perm[i], perm[j] = perm[j], perm[i]
    return Propagation(Shard(perm.index(d), s.blocks, s.kind))


def named_args(node: fx.Node) -> dict:
    """The node's arguments by schema name (defaults filled in)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _reduction(node, specs, t) -> Propagation:
    src, s = _single_input(node, specs)
    nd = len(shape_of(src))
    d = _norm(s.dim, nd)
    args = named_args(node)
    dims = args.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        raise NoRule("reduction over all dimensions", "mix")
    dims = [_norm(x, nd) for x in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if d in dims:
        raise NoRule("reduction over the sharded dimension", "mix")
    keep = bool(args.get("keepdim", False))
    out = Shard(d if keep else d - sum(x < d for x in dims), s.blocks, s.kind)
    if isinstance(node.meta.get("val"), (tuple, list)):
        out = tuple(out for _ in node.meta["val"])
    return Propagation(out)


def _along_dim(dim_index: int) -> Callable:
    """Ops that act along one dimension argument (softmax, cumsum, ...): fine if it is not the shard."""

    def rule(node, specs, t):
        src, s = _single_input(node, specs)
        nd = len(shape_of(src))
        dim = node.args[dim_index] if len(node.args) > dim_index else node.kwargs.get("dim")
        if _norm(dim, nd) == _norm(s.dim, nd):
            raise NoRule(f"{_packet(node).__name__} along the sharded dimension", "mix")
        return Propagation(Shard(_norm(s.dim, nd), s.blocks, s.kind))

    return rule


def _norm_layer(node, specs, t) -> Propagation:
    src, s = _single_input(node, specs)
    nd = len(shape_of(src))
    normalized = node.args[1]
    if _norm(s.dim, nd) >= nd - len(normalized):
        raise NoRule("normalization over the sharded dimension", "mix")
    bcast = tuple(a for a in tensor_operands(node)[1:])
    return Propagation(Shard(_norm(s.dim, nd), s.blocks, s.kind), {}, bcast)


def _select(node, specs, t) -> Propagation:
    src, s = _single_input(node, specs)
    nd = len(shape_of(src))
    d, dim = _norm(s.dim, nd), _norm(node.args[1], nd)
    if dim == d:
        raise NoRule("select along the sharded dimension", "mix")
    return Propagation(Shard(d - (dim < d), s.blocks, s.kind))


def _slice(node, specs, t) -> Propagation:
    src, s = _single_input(node, specs)
    ish = shape_of(src)
    nd = len(ish)
    d = _norm(s.dim, nd)
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, nd)
    if dim == d and shape_of(node)[d] != ish[d]:
        raise NoRule("slice along the sharded dimension", "mix")
    return Propagation(Shard(d, s.blocks, s.kind))


def _pad(node, specs, t) -> Propagation:
    src, s = _single_input(node, specs)
    nd = len(shape_of(src))
    d = _norm(s.dim, nd)
    pads = node.args[1]
    for i in range(0, len(pads), 2):
        if nd - 1 - i // 2 == d and (pads[i] or pads[i + 1]):
            raise NoRule("padding along the sharded dimension", "mix")
    return Propagation(Shard(d, s.blocks, s.kind))


def _split(node, specs, t) -> Propagation:
    src, s = _single_input(node, specs)
    ish = shape_of(src)
    nd = len(ish)
    d = _norm(s.dim, nd)
    outs = node.meta["val"]
    p = _packet(node)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if p is aten.unbind:
        dim = node.args[1] if len(node.args) > 1 else 0
    dim = _norm(dim, nd)
    if dim != d:
        nd_out = d - (dim < d) if p is aten.unbind else d
        return Propagation(tuple(Shard(nd_out, s.blocks, s.kind) for _ in outs))
    if p is aten.unbind:
        raise NoRule("unbind along the sharded dimension", "mix")
    sizes = [o.shape[d] for o in outs]
    n = ish[d]
    block = n // s.blocks
    if any(sz % block for sz in sizes):
        g = math.gcd(*sizes, n)
        raise NoRule(f"split into {sizes} needs {n // g} blocks", "blocks", n // g)
    return Propagation(tuple(Shard(d, sz // block, s.kind) for sz in sizes))


def _cat(node, specs, t) -> Propagation:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    nd = len(shape_of(node))
    if _packet(node) is aten.stack:
        raise NoRule("stack of sharded values", "unsupported")
    placed = None
    for a in tensors:
        sa = specs.get(a)
        if isinstance(sa, Shard):
            if placed is not None and placed != sa:
                raise NoRule("cat of differently sharded values", "mix")
            placed = sa
        elif isinstance(sa, Partial):
            raise NoRule("partial operand", "mix")
    d = _norm(placed.dim, nd)
    if _norm(dim, nd) == d:
        raise NoRule("cat along the sharded dimension", "mix")
    slices = {a: Shard(d, placed.blocks, placed.kind) for a in tensors
              if is_tensor_node(a) and a not in specs}
    return Propagation(Shard(d, placed.blocks, placed.kind), slices)


def _embedding(node, specs, t) -> Propagation:
    weight, idx = node.args[0], node.args[1]
    s = specs.get(idx)
    if not isinstance(s, Shard) or weight in specs:
        raise NoRule("embedding with a sharded table", "unsupported")
    return Propagation(Shard(_norm(s.dim, len(shape_of(idx))), s.blocks, s.kind), {}, (weight,))


def _no_output(node, specs, t) -> Propagation:
    return Propagation(None)


def _fresh(node, specs, t) -> Propagation:
    """new_ones(x, size) and friends: the output does not depend on x's values."""
    return Propagation(REPLICATE)


# ------------------------------------------------------ matmul family (col / row / batch)


def matmul_roles(node) -> Optional[tuple[fx.Node, fx.Node, int, int]]:
    """For a matmul-like node: (x, w, w_in_dim, w_out_dim) where y = x @ w (x's last dim contracts
    with w's dim ``w_in_dim``). None for ops that are not matmuls."""
    p = _packet(node)
    if p is aten.linear:
        return node.args[0], node.args[1], 1, 0
    if p is aten.addmm:
        return node.args[1], node.args[2], 0, 1
    if p in (aten.mm, aten.matmul, aten.bmm):
        w = node.args[1]
        nd = len(shape_of(w))
        return node.args[0], w, nd - 2, nd - 1
    return None


def _matmul(node, specs, t) -> Propagation:
    x, w, w_in, w_out = matmul_roles(node)
    sx, sw = specs.get(x), specs.get(w)
    xnd, wnd, ond = len(shape_of(x)), len(shape_of(w)), len(shape_of(node))
    others = [a for a in tensor_operands(node) if a is not x and a is not w]
    if any(isinstance(specs.get(a), (Shard, Partial)) for a in others):
        raise NoRule("sharded bias", "unsupported")
    if isinstance(sx, Partial) or isinstance(sw, Partial):
        raise NoRule("partial operand", "mix")
    if isinstance(sx, Shard) and _norm(sx.dim, xnd) == xnd - 1:
        if isinstance(sw, Shard) and _norm(sw.dim, wnd) == w_in and sw.blocks == sx.blocks \
                and w.op == "placeholder":
            # a row-parallel weight; a bias here is split off by split_row_bias_pass
            return Propagation(PARTIAL)
        raise NoRule("contraction over a sharded dimension", "mix")
    if isinstance(sw, Shard) and _norm(sw.dim, wnd) == w_out:
        if sx is not None and wnd == 2:
            raise NoRule("column-parallel weight on a sharded input", "unsupported")
        if wnd > 2 and isinstance(sx, Shard):
            raise NoRule("both matmul operands sharded", "mix")
        return Propagation(Shard(ond - 1, sw.blocks, sw.kind), {}, tuple(others))
    if isinstance(sw, Shard) and wnd > 2 and _norm(sw.dim, wnd) < wnd - 2:
        return _batched(node, specs, x, w, t)
    if isinstance(sx, Shard):
        d = _norm(sx.dim, xnd)
        if wnd > 2 and d < xnd - 2:
            return _batched(node, specs, x, w, t)
        if wnd > 2 and d == xnd - 2 and isinstance(sw, Shard):
            raise NoRule("both matmul operands sharded", "mix")
        # a row dimension (tokens) of x: each row independently through a replicated weight
        if isinstance(sw, Shard):
            raise NoRule("weight sharded on its contraction dimension", "mix")
        return Propagation(Shard(d + ond - xnd, sx.blocks, sx.kind), {}, (w, *others))
    raise NoRule("no sharded operand", "unsupported")


def _batched(node, specs, x, w, t) -> Propagation:
    """Batched matmul sharded on a batch dimension (attention heads)."""
    ond = len(shape_of(node))
    sx, sw = specs.get(x), specs.get(w)
    ref = sx if isinstance(sx, Shard) else sw
    ref_node = x if isinstance(sx, Shard) else w
    d = _norm(ref.dim, len(shape_of(ref_node))) + ond - len(shape_of(ref_node))
    slices, bcast = {}, []
    for a, s in ((x, sx), (w, sw)):
        k = d - (ond - len(shape_of(a)))
        if isinstance(s, Shard):
            if _norm(s.dim, len(shape_of(a))) != k or s.blocks != ref.blocks:
                raise NoRule("batched matmul operands sharded differently", "mix")
        elif k < 0 or shape_of(a)[k] == 1:
            bcast.append(a)
        else:
            slices[a] = Shard(k, ref.blocks, ref.kind)
    return Propagation(Shard(d, ref.blocks, ref.kind), slices, tuple(bcast))


def _sdpa(node, specs, t) -> Propagation:
    q, k, v = node.args[:3]
    ond = len(shape_of(node))
    ref = None
    for a in (q, k, v):
        s = specs.get(a)
        if isinstance(s, Partial):
            raise NoRule("partial operand", "mix")
        if isinstance(s, Shard):
            d = _norm(s.dim, len(shape_of(a)))
            if d >= len(shape_of(a)) - 2:
                raise NoRule("attention mixes tokens and features", "mix")
            if ref is not None and ref != (d, s.blocks):
                raise NoRule("q, k, v sharded differently", "mix")
            ref = (d, s.blocks)
            kind = s.kind
    if ref is None:
        raise NoRule("only the attention mask is sharded", "unsupported")
    d, blocks = ref
    slices, bcast = {}, []
    for a in tensor_operands(node):
        if a in specs:
            continue
        kk = d - (ond - len(shape_of(a)))
        if kk < 0 or shape_of(a)[kk] == 1:
            bcast.append(a)
        else:
            slices[a] = Shard(kk, blocks, kind)
    return Propagation(Shard(d, blocks, kind), slices, tuple(bcast))


# ----------------------------------------------------------------------- dispatch

ELEMENTWISE = {
    aten.add, aten.sub, aten.rsub, aten.mul, aten.div, aten.pow, aten.neg, aten.rsqrt, aten.sqrt,
    aten.tanh, aten.gelu, aten.silu, aten.relu, aten.sigmoid, aten.exp, aten.log, aten.where,
    aten.masked_fill, aten.clone, aten.contiguous, aten.alias, aten.to, aten._to_copy,
    aten.type_as, aten.dropout, aten.native_dropout, aten.eq, aten.ne, aten.lt, aten.gt, aten.le,
    aten.ge, aten.abs, aten.erf, aten.cos, aten.sin, aten.clamp, aten.minimum, aten.maximum,
    aten.logical_not, aten.logical_and, aten.logical_or, aten.__and__, aten.__or__,
    aten.bitwise_and, aten.bitwise_or, aten.ones_like, aten.zeros_like, aten.full_like,
    aten.empty_like, aten.detach, aten.lift_fresh_copy, aten.square, aten.reciprocal,
    aten.softplus, aten.hardtanh, aten.leaky_relu, aten.mish, aten.sign, aten.floor,
    aten.expm1, aten.log1p, aten.clamp_min, aten.clamp_max, aten.gelu_, aten.relu_,
    aten.silu_, aten.dropout_, aten.add_, aten.mul_, aten.copy, aten.hardswish, aten.hardsigmoid,
}
RESHAPES = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten,
            aten.unsqueeze, aten.squeeze, aten.view_copy}
REDUCTIONS = {aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.logsumexp,
              aten.max, aten.min, aten.argmax, aten.argmin, aten.var_mean, aten.norm,
              aten.linalg_vector_norm, aten.prod, aten.any, aten.all}
RULES: dict = {
    aten.expand: _expand, aten.transpose: _permute_like, aten.permute: _permute_like,
    aten.t: _permute_like, aten._softmax: _along_dim(1), aten.softmax: _along_dim(1),
    aten._log_softmax: _along_dim(1), aten.log_softmax: _along_dim(1),
    aten.cumsum: _along_dim(1), aten.layer_norm: _norm_layer, aten.rms_norm: _norm_layer,
    aten.select: _select, aten.slice: _slice, aten.pad: _pad, aten.constant_pad_nd: _pad,
    aten.split: _split, aten.split_with_sizes: _split, aten.chunk: _split, aten.unbind: _split,
    aten.cat: _cat, aten.stack: _cat, aten.embedding: _embedding,
    aten._assert_tensor_metadata: _no_output, aten.new_ones: _fresh, aten.new_zeros: _fresh,
    aten.new_empty: _fresh, aten.new_full: _fresh,
    aten.linear: _matmul, aten.addmm: _matmul, aten.mm: _matmul, aten.matmul: _matmul,
    aten.bmm: _matmul, aten.scaled_dot_product_attention: _sdpa,
}
for _p in ELEMENTWISE:
    RULES[_p] = _elementwise
for _p in RESHAPES:
    RULES[_p] = _reshape
for _p in REDUCTIONS:
    RULES[_p] = _reduction

# Ops through which a Partial stays Partial (linear in each summand, no reduction needed yet).
PARTIAL_SAFE = {aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze,
                aten.transpose, aten.permute, aten.alias, aten.contiguous, aten.clone,
                aten.flatten, aten.unflatten}


def propagate(node: fx.Node, specs: dict, t: int) -> Propagation:
    """The layout of ``node``'s output given ``specs`` (Node -> Layout) for its sharded inputs."""
    if node.op != "call_function":
        raise NoRule(f"{node.op} node", "unsupported")
    if node.target is operator.getitem:
        src, idx = node.args
        s = specs.get(src)
        if isinstance(s, tuple):
            return Propagation(s[idx])
        raise NoRule("getitem of a non-tuple", "unsupported")
    ins = [specs.get(a) for a in tensor_operands(node)]
    if any(isinstance(s, Partial) for s in ins):
        return _propagate_partial(node, specs)
    rule = RULES.get(_packet(node))
    if rule is None:
        raise NoRule(f"no sharding rule for {node.target}", "unsupported")
    return rule(node, specs, t)


def _propagate_partial(node, specs) -> Propagation:
    p = _packet(node)
    ops = tensor_operands(node)
    if p in PARTIAL_SAFE and len(ops) == 1:
        return Propagation(PARTIAL)
    if p in (aten.add, aten.sub) and all(isinstance(specs.get(a), Partial) for a in ops):
        return Propagation(PARTIAL)
    if p in (aten.mul, aten.div) and node.args[0] is ops[0] and \
            sum(isinstance(a, fx.Node) for a in node.args) == 1:
        return Propagation(PARTIAL)  # scaled by a Python number
    raise NoRule(f"{node.target} needs the full sum of a partial value", "mix")


__all__ = ["NoRule", "Propagation", "propagate", "reshape_spec", "matmul_roles", "shape_of",
           "tensor_operands", "is_tensor_node", "named_args", "REPLICATE", "PARTIAL"]
