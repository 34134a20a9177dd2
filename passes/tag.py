"""Tag every node with its layout and every consumer with the transitions it needs."""
from __future__ import annotations

import torch.fx as fx

from .match import META
from .options import PassOptions
from .plan import plan_layouts


def tag_layouts_pass(gm: fx.GraphModule, *, options: PassOptions) -> fx.GraphModule:
    """Matches: every node (via :func:`passes.plan.plan_layouts`).
    Rewrites: nothing; edits ``meta`` in place.
    Requires: ``meta["val"]`` (global shapes) on every node, placeholder kinds.
    Ensures: ``meta["autoseqpar"]["layout"]`` on every non-replicated node and
    ``meta["autoseqpar"]["transitions"]`` (tuple of :class:`passes.plan.Transition`) on every
    consumer that needs one; the :class:`passes.plan.Plan` in ``gm.meta["autoseqpar_plan"]``."""
    plan = plan_layouts(gm, options)
    by_consumer: dict = {}
    for tr in plan.transitions:
        by_consumer.setdefault(tr.consumer, []).append(tr)
    for n in gm.graph.nodes:
        meta = n.meta.setdefault(META, {})
        meta["layout"] = plan.layout(n.name)
        meta["transitions"] = tuple(by_consumer.get(n.name, ()))
    gm.meta["autoseqpar_plan"] = plan
    return gm
