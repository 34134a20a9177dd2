"""Tensor-parallel rewrites: split row-parallel biases, shard weights, insert TP collectives."""
from __future__ import annotations

import torch
import torch.fx as fx

from .layout import Shard, local_shape
from .match import META, find_tp_blocks
from .options import PassOptions
from .redistribute import insert_transitions, stamp

aten = torch.ops.aten


def split_row_bias_pass(gm: fx.GraphModule, *, options: PassOptions) -> fx.GraphModule:
    """Matches: row-parallel linears with a bias (``linear(x, W, b)``, ``addmm(b, x, W)``).
    Rewrites: into ``add(matmul(x, W), b)`` so that the bias is added once, after the partial
    sums are reduced (as Megatron's RowParallelLinear does), instead of once per rank.
    Requires: global shapes in ``meta["val"]``. Ensures: no row-parallel matmul has a bias.
    Edits in place and returns ``gm``."""
    rows = [l for b in find_tp_blocks(gm, options.tp).blocks for l in b.rows if l.bias]
    nodes = {n.name: n for n in gm.graph.nodes}
    for row in rows:
        n = nodes[row.node]
        p = n.target.overloadpacket
        with gm.graph.inserting_before(n):
            if p is aten.linear:
                mm = gm.graph.call_function(aten.linear.default, (n.args[0], n.args[1]))
            else:  # addmm(b, x, W)
                mm = gm.graph.call_function(aten.mm.default, (n.args[1], n.args[2]))
            mm.meta.update({k: v for k, v in n.meta.items() if k != META})
        with gm.graph.inserting_after(mm):
            add = gm.graph.call_function(aten.add.Tensor, (mm, nodes[row.bias]))
            add.meta.update({k: v for k, v in n.meta.items() if k != META})
        n.replace_all_uses_with(add)
        gm.graph.erase_node(n)
        stamp(mm, "split_row_bias_pass", source=row.node)
        stamp(add, "split_row_bias_pass", source=row.node)
    gm.recompile()
    return gm


def shard_parameters_pass(gm: fx.GraphModule, *, options: PassOptions) -> fx.GraphModule:
    """Matches: placeholders tagged with a ``Shard`` layout (column/row weights, column biases).
    Rewrites: nothing in the code; records ``meta["autoseqpar"]["shard"]`` (the spec the runtime
    slices the real parameter by) and ``meta["autoseqpar"]["local_shape"]``.
    Requires: ``tag_layouts_pass``. Ensures: every sharded parameter says how it is split."""
    for n in gm.graph.nodes:
        meta = n.meta.get(META, {})
        if n.op == "placeholder" and isinstance(meta.get("layout"), Shard):
            meta["shard"] = meta["layout"]
            meta["local_shape"] = tuple(local_shape(n.meta["val"].shape, meta["layout"], options.tp))
    return gm


def insert_tensor_parallel_collectives_pass(gm: fx.GraphModule, *, options: PassOptions) -> fx.GraphModule:
    """Matches: transitions tagged ``all_reduce`` (row output -> replicated consumer) and
    ``copy_to_tp`` (replicated value -> column input, without sequence parallelism).
    Rewrites: inserts :func:`passes.collectives.all_reduce_partial` / ``copy_to_group`` nodes.
    Requires: ``tag_layouts_pass``. Ensures: Megatron's ``g`` and ``f`` around every TP block."""
    insert_transitions(gm, ("all_reduce", "copy_to_tp"), options,
                       "insert_tensor_parallel_collectives_pass")
    gm.recompile()
    return gm
