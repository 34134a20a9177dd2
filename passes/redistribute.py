"""Shared mechanics of the passes that insert the transitions tagged by ``tag_layouts_pass``."""
from __future__ import annotations

import torch.fx as fx

from .collectives import FUNCTIONS
from .layout import REPLICATE, Shard
from .match import META
from .options import PassOptions


def stamp(node: fx.Node, pass_name: str, **extra) -> fx.Node:
    """Record which pass made ``node`` (provenance, read by reports and lints)."""
    meta = node.meta.setdefault(META, {})
    meta["pass"] = pass_name
    meta.update(extra)
    return node


def current_input(consumer: fx.Node, producer_name: str):
    """The node that now feeds ``consumer`` in place of ``producer_name`` (the producer itself, or
    the last transition inserted for it)."""
    for a in consumer.all_input_nodes:
        if a.name == producer_name or a.meta.get(META, {}).get("source") == producer_name:
            return a
    return None


def insert_transitions(gm: fx.GraphModule, kinds: tuple, options: PassOptions, pass_name: str):
    """Insert one node per (producer, kind, spec) for every tagged transition of ``kinds``,
    shared by all consumers that need the same one. Returns the number inserted."""
    made: dict = {}
    count = 0
    for consumer in list(gm.graph.nodes):
        for tr in consumer.meta.get(META, {}).get("transitions", ()):
            if tr.kind not in kinds:
                continue
            src = current_input(consumer, tr.producer)
            if src is None:
                raise RuntimeError(f"{pass_name}: {consumer.name} no longer reads {tr.producer}")
            key = (src, tr.kind, tr.spec)
            if key not in made:
                made[key] = _make(gm, src, tr, options, pass_name)
                count += 1
            consumer.replace_input_with(src, made[key])
    return count


def _make(gm, src: fx.Node, tr, options: PassOptions, pass_name: str) -> fx.Node:
    fn = FUNCTIONS[tr.kind]
    if isinstance(tr.spec, Shard):
        args = (src, tr.spec.dim, tr.spec.blocks, options.group_name)
    else:
        args = (src, options.group_name)
    anchor = src
    if src.op == "placeholder":
        anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(anchor):
        node = gm.graph.create_node("call_function", fn, args, {}, name=f"{src.name}_{tr.kind}")
    layout = _after(tr, src)
    node.meta["val"] = src.meta.get("val")
    return stamp(node, pass_name, source=tr.producer, kind=tr.kind, spec=tr.spec,
                 layout=layout)


def _after(tr, src):
    if tr.kind in ("reduce_scatter", "scatter"):
        return tr.spec
    if tr.kind in ("copy_to_tp", "grad_sync"):
        return src.meta.get(META, {}).get("layout", REPLICATE)
    return REPLICATE
