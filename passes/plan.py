"""The parallel plan: a layout for every value and the transition on every edge that needs one.

:func:`plan_layouts` joins the analyses of :mod:`passes.match` into a :class:`Plan`. Rules for the
transitions (a value's layout as produced -> the layout its consumer needs), following Megatron's
conjugate pairs so that every replicated value carries a full, identical gradient:

=============  =====================================  ==================  ===================
kind           where                                  forward             backward
=============  =====================================  ==================  ===================
reduce_scatter row output -> sequence region          reduce-scatter      all-gather
all_reduce     row output -> replicated consumer      all-reduce          identity
all_gather     sequence shard -> column input         all-gather          reduce-scatter
gather         sequence shard -> replicated consumer  all-gather          take own shard
scatter        replicated -> sharded consumer         take own shard      all-gather
copy_to_tp     replicated -> column input (no SP)     identity            all-reduce
grad_sync      replicated operand broadcast over a    identity            all-reduce
               sharded op (norm weights, biases)
=============  =====================================  ==================  ===================
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .layout import REPLICATE, Layout, Partial, Shard
from .match import (SeqRegion, TPAnalysis, find_seq_labels, find_seq_region, find_tp_blocks,
                    is_metadata_check, is_param, placeholder_kind)
from .options import PassOptions
from .propagate import NoRule, matmul_roles, propagate, tensor_operands


@dataclass(frozen=True)
class Transition:
    producer: str
    consumer: str
    kind: str
    spec: object  # the Shard involved (None for all_reduce / copy_to_tp / grad_sync)


@dataclass(frozen=True)
class Plan:
    tp: TPAnalysis
    seq: SeqRegion
    layouts: dict  # node name -> Layout (Replicate for everything not listed elsewhere)
    transitions: tuple[Transition, ...]

    def layout(self, name: str) -> Layout:
        return self.layouts.get(name, REPLICATE)


def needs_grad_nodes(gm: fx.GraphModule) -> set:
    """Nodes whose value may carry a gradient: floating values depending on a parameter or a
    floating user input."""
    out: set = set()
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        floating = isinstance(v, torch.Tensor) and v.is_floating_point()
        if n.op == "placeholder":
            if floating and placeholder_kind(n) in ("param", "input"):
                out.add(n)
        elif floating and any(a in out for a in n.all_input_nodes):
            out.add(n)
        elif n.op == "call_function" and isinstance(v, (tuple, list)) and \
                any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def plan_layouts(gm: fx.GraphModule, options: PassOptions) -> Plan:
    t = options.tp
    tp = find_tp_blocks(gm, t)
    if options.sequence_parallel:
        labels = find_seq_labels(gm, t, options.seq_dim)
        seq = find_seq_region(gm, tp, labels, t)
    else:
        labels, seq = {}, SeqRegion({}, (), ())
    layouts: dict = dict(tp.layouts)
    layouts.update(seq.layouts)
    for b in tp.blocks:
        for l in (*b.columns, *b.rows):
            layouts[l.weight] = l.weight_shard
            if l.bias_shard is not None:
                layouts[l.bias] = l.bias_shard
    grads = needs_grad_nodes(gm)
    cols = {l.node for b in tp.blocks for l in b.columns}
    transitions: list = []
    for n in gm.graph.nodes:
        if n.op == "output" or (n.op == "call_function" and not is_metadata_check(n)):
            transitions.extend(_edges(n, layouts, labels, cols, grads, t))
    return Plan(tp, seq, layouts, tuple(transitions))


def _primary(layout):
    """A multi-output op's layout is a tuple; its first element stands for all."""
    if isinstance(layout, tuple):
        return next((x for x in layout if isinstance(x, (Shard, Partial))), REPLICATE)
    return layout


def _edges(n: fx.Node, layouts: dict, labels: dict, cols: set, grads: set, t: int) -> list:
    out_layout = _primary(layouts.get(n.name, REPLICATE))
    operands = n.all_input_nodes if n.op == "output" else tensor_operands(n)
    sharded_consumer = isinstance(out_layout, (Shard, Partial)) and n.op != "output"
    column_input = matmul_roles(n)[0] if n.name in cols else None
    res: list = []
    needs_rule = []
    for a in operands:
        la = _primary(layouts.get(a.name, REPLICATE))
        if isinstance(la, Partial):
            if isinstance(out_layout, Partial):
                continue
            if isinstance(out_layout, Shard) and out_layout.kind == "seq":
                res.append(Transition(a.name, n.name, "reduce_scatter", labels[a]))
            else:
                res.append(Transition(a.name, n.name, "all_reduce", None))
                needs_rule.append(a)
        elif isinstance(la, Shard) and la.kind == "seq":
            if isinstance(out_layout, Shard) and out_layout.kind == "seq":
                continue
            if a is column_input:
                res.append(Transition(a.name, n.name, "all_gather", la))
            else:
                res.append(Transition(a.name, n.name, "gather", la))
                needs_rule.append(a)
        elif isinstance(la, Shard):
            if not sharded_consumer and not is_param(a):
                raise NoRule(f"{a.name} is sharded by features but {n.name} needs it whole")
        else:
            needs_rule.append(a)
    if not sharded_consumer:
        return res
    prop = None
    for a in needs_rule:
        if a is column_input:
            if a in grads:
                res.append(Transition(a.name, n.name, "copy_to_tp", None))
            continue
        if isinstance(layouts.get(a.name), Shard) and is_param(a):
            continue
        if prop is None:
            prop = propagate(n, _consumer_specs(n, layouts, labels, out_layout), t)
        if a not in prop.slices and isinstance(out_layout, Shard) and out_layout.kind == "seq" \
                and isinstance(labels.get(a), Shard):
            res.append(Transition(a.name, n.name, "scatter", labels[a]))
        elif a in prop.slices:
            res.append(Transition(a.name, n.name, "scatter", prop.slices[a]))
        elif a in grads:
            res.append(Transition(a.name, n.name, "grad_sync", None))
    return res


def _consumer_specs(n: fx.Node, layouts: dict, labels: dict, out_layout) -> dict:
    """The layouts ``n`` sees on its operands once the transitions into it are made."""
    kind = out_layout.kind if isinstance(out_layout, Shard) else "tp"
    specs = {}
    for k in tensor_operands(n):
        lk = layouts.get(k.name, REPLICATE)
        if isinstance(lk, tuple) and isinstance(_primary(lk), Shard) and _primary(lk).kind == kind:
            specs[k] = lk
        elif isinstance(lk, Shard) and lk.kind == kind:
            specs[k] = lk
        elif isinstance(lk, Partial):
            if isinstance(out_layout, Partial):
                specs[k] = lk
            elif kind == "seq":
                specs[k] = labels[k]
        elif kind == "seq" and isinstance(labels.get(k), Shard) and not isinstance(lk, Shard):
            specs[k] = labels[k]  # a replicated token-carrying operand: scattered on entry
    return specs
