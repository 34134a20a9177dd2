"""Rewrite shape arguments to per-rank shapes, then re-derive every node's shape."""
from __future__ import annotations

import torch
import torch.fx as fx

from ._compat import FakeTensorMode, FakeTensorProp
from .layout import Shard, local_shape
from .match import META
from .options import PassOptions

aten = torch.ops.aten
_SIZE_ARG = {aten.view, aten.reshape, aten._unsafe_view, aten.view_copy, aten.expand}


def localize_shapes_pass(gm: fx.GraphModule, *, options: PassOptions) -> fx.GraphModule:
    """Matches: ops with literal sizes whose output (or split input) is sharded: view, reshape,
    expand, unflatten, split, split_with_sizes.
    Rewrites: the size arguments to the per-rank sizes (``-1`` made explicit).
    Requires: ``tag_layouts_pass`` and global ``meta["val"]``. Ensures: the graph runs on local
    shards; edits in place."""
    t = options.tp
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        p = getattr(n.target, "overloadpacket", None)
        layout = n.meta.get(META, {}).get("layout")
        if p in _SIZE_ARG and isinstance(layout, Shard):
            n.args = (n.args[0], local_shape(n.meta["val"].shape, layout, t), *n.args[2:])
        elif p is aten.unflatten and isinstance(layout, Shard):
            dim = n.args[1] % n.args[0].meta["val"].dim()
            loc = local_shape(n.meta["val"].shape, layout, t)
            n.args = (n.args[0], n.args[1], loc[dim:dim + len(n.args[2])])
        elif p in (aten.split, aten.split_with_sizes):
            src = n.args[0]
            sl = src.meta.get(META, {}).get("layout")
            dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % src.meta["val"].dim()
            if isinstance(sl, Shard) and sl.dim % src.meta["val"].dim() == dim:
                size = n.args[1]
                size = [s // t for s in size] if isinstance(size, (list, tuple)) else size // t
                n.args = (src, size, *n.args[2:])
    gm.recompile()
    return gm


def propagate_local_shapes_pass(gm: fx.GraphModule, *, options: PassOptions) -> fx.GraphModule:
    """Matches: every node. Rewrites: ``meta["val"]`` to the per-rank fake value, by running the
    rewritten graph on fake tensors (parameters at their shard shapes).
    Requires: a rewritten graph and ``meta["autoseqpar"]["local_shape"]`` on sharded
    parameters. Ensures: every shape in ``meta`` is the shape this rank computes -- and a shape
    error here names the node the rewrite got wrong."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    args = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            shape = n.meta.get(META, {}).get("local_shape", tuple(v.shape))
            with mode:
                args.append(torch.empty(shape, dtype=v.dtype, device=v.device))
        else:
            args.append(n.meta.get(META, {}).get("example", v))
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*args)
    return gm
