"""Per-rank random streams for dropout on sharded values.

Dropout on a sequence shard (or on the heads of one rank) must draw a different mask on each
rank, as Megatron's model-parallel RNG does; dropout on replicated values must draw the same
mask everywhere. The pass routes sharded dropouts through :func:`with_rank_rng`, which runs the
original op with the default generator temporarily swapped for a per-rank generator (a graph
input), so the op itself -- and its scaling -- is unchanged, and replicated dropouts keep the
global stream.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .layout import Shard
from .match import META
from .options import PassOptions
from .redistribute import stamp

aten = torch.ops.aten
RNG_PLACEHOLDER = "rank_rng"


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or 0]
    return torch.default_generator


def with_rank_rng(gen: torch.Generator, op, *args, **kwargs):
    """Run ``op`` drawing its random numbers from ``gen`` instead of the default generator."""
    default = _default_generator(gen.device)
    saved = default.get_state()
    default.set_state(gen.get_state())
    try:
        return op(*args, **kwargs)
    finally:
        gen.set_state(default.get_state())
        default.set_state(saved)


def _random_on_shard(n: fx.Node) -> bool:
    p = getattr(n.target, "overloadpacket", None)
    layout = n.meta.get(META, {}).get("layout")
    if isinstance(layout, tuple):
        layout = layout[0]
    if not isinstance(layout, Shard):
        return False
    if p in (aten.dropout, aten.native_dropout, aten.bernoulli, aten.rand_like):
        return True
    if p is aten.scaled_dot_product_attention:
        drop = n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)
        return bool(drop)
    return False


def fork_dropout_rng_pass(gm: fx.GraphModule, *, options: PassOptions) -> fx.GraphModule:
    """Matches: dropout (and attention with dropout) whose output is sharded.
    Rewrites: ``op(*args)`` into ``with_rank_rng(rank_rng, op, *args)``, adding the placeholder
    ``rank_rng`` (``meta["autoseqpar"]["kind"] == "rng"``) when any node matches.
    Requires: ``tag_layouts_pass``. Ensures: sharded dropout masks differ between ranks and are
    reproducible from the per-rank seed."""
    hits = [n for n in gm.graph.nodes if n.op == "call_function" and _random_on_shard(n)]
    if not hits:
        return gm
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        gen = gm.graph.placeholder(RNG_PLACEHOLDER)
    gen.meta[META] = {"kind": "rng", "example": torch.Generator()}
    for n in hits:
        n.args = (gen, n.target, *n.args)
        n.target = with_rank_rng
        stamp(n, "fork_dropout_rng_pass")
    gm.recompile()
    return gm
