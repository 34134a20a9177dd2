"""Dropout whose mask is a pure function of (seed, site): per-rank streams that replay exactly.

Every training-mode dropout ``aten.dropout(x, p, True)`` becomes

    mask = autoseqpar::dropout_mask(x, p, seeds[i], site)     # bool, 1 byte per element
    out  = x * mask * (1 / (1 - p))

``seeds`` is a graph input (an int64 pair the runtime draws fresh for every step): index 0 is
distinct on every rank and drives dropout on sharded values (sequence shards, head shards), so
ranks draw different masks as Megatron's model-parallel RNG does; index 1 is the same on every
rank and drives dropout on replicated values, which must agree. ``site`` is the node's position
in the graph (identical on every rank). Because the mask depends on nothing else, recomputing it
in backward reproduces the forward's mask bit for bit -- the recompute solver may either save
the 1-byte mask or rebuild it from the 8-byte seed, and neither changes the gradients.
Dropout with ``p == 0`` (or in eval mode) is the identity and is removed.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .layout import Shard
from .match import META
from .options import PassOptions
from .redistribute import stamp

aten = torch.ops.aten
SEED_PLACEHOLDER = "dropout_seeds"
_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """splitmix64 over ``parts``: a well-spread 63-bit seed from (base, rank, step, site...)."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z + (int(p) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z & ((1 << 63) - 1)


@torch.library.custom_op("autoseqpar::dropout_mask", mutates_args=())
def dropout_mask(x: torch.Tensor, p: float, seed: torch.Tensor, site: int) -> torch.Tensor:
    """Keep-mask (True = keep, probability ``1 - p``) of ``x``'s shape, from (seed, site) only."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(mix_seed(int(seed.item()), site))
    keep = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    keep.bernoulli_(1.0 - p, generator=gen)
    return keep.bool()


@dropout_mask.register_fake
def _(x, p, seed, site):
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


def _dropout_args(n: fx.Node):
    """(input, p, train) of a dropout node, else None."""
    p = getattr(n.target, "overloadpacket", None)
    if p in (aten.dropout, aten.native_dropout):
        x = n.args[0]
        prob = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
        train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train", True)
        return x, float(prob), train
    return None


def _sharded(n: fx.Node) -> bool:
    layout = n.meta.get(META, {}).get("layout")
    if isinstance(layout, tuple):
        layout = layout[0] if layout else None
    return isinstance(layout, Shard)


def fork_dropout_rng_pass(gm: fx.GraphModule, *, options: PassOptions) -> fx.GraphModule:
    """Matches: ``aten.dropout`` / ``aten.native_dropout`` nodes.
    Rewrites: identity when ``p == 0`` or not training; otherwise ``x * dropout_mask(x, p,
    seeds[i], site) * 1/(1-p)`` with ``i = 0`` on sharded values (per-rank stream) and ``i = 1``
    on replicated ones; adds the ``dropout_seeds`` placeholder (``meta["autoseqpar"]["kind"]
    == "seeds"``) when any dropout is kept.
    Requires: ``tag_layouts_pass`` (layouts). Ensures: sharded dropout masks differ between
    ranks, replicated ones agree, and every mask can be recomputed exactly."""
    seeds = None
    for site, n in enumerate(list(gm.graph.nodes)):
        args = n.op == "call_function" and _dropout_args(n)
        if not args:
            continue
        x, prob, train = args
        native = getattr(n.target, "overloadpacket", None) is aten.native_dropout
        if prob == 0.0 or not train:
            if native:
                continue  # (out, mask) users read a mask: keep the op as it is
            n.replace_all_uses_with(x)
            gm.graph.erase_node(n)
            continue
        if seeds is None:
            seeds = _seed_placeholder(gm)
        with gm.graph.inserting_before(n):
            seed = gm.graph.call_function(aten.select.int, (seeds, 0, 0 if _sharded(n) else 1))
            mask = gm.graph.call_function(torch.ops.autoseqpar.dropout_mask.default,
                                          (x, prob, seed, site))
            kept = gm.graph.call_function(aten.mul.Tensor, (x, mask))
            out = gm.graph.call_function(aten.mul.Tensor, (kept, 1.0 / (1.0 - prob)))
        layout = n.meta.get(META, {}).get("layout")
        for new in (seed, mask, kept, out):
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in n.meta:
                    new.meta[key] = n.meta[key]
            stamp(new, "fork_dropout_rng_pass", source=n.name, layout=layout)
        seed.meta[META]["layout"] = None
        if native:
            for u in list(n.users):  # getitem(native_dropout, 0 | 1)
                u.replace_all_uses_with(out if u.args[1] == 0 else mask)
                gm.graph.erase_node(u)
        n.replace_all_uses_with(out)
        gm.graph.erase_node(n)
    gm.recompile()
    return gm


def _seed_placeholder(gm: fx.GraphModule) -> fx.Node:
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        seeds = gm.graph.placeholder(SEED_PLACEHOLDER)
    seeds.meta[META] = {"kind": "seeds", "example": torch.zeros(2, dtype=torch.int64)}
    seeds.meta["val"] = torch.zeros(2, dtype=torch.int64)
    return seeds
