"""Sequence-parallel rewrite: collectives around the sequence-local regions."""
from __future__ import annotations

import torch.fx as fx

from .options import PassOptions
from .redistribute import insert_transitions


def insert_sequence_parallel_collectives_pass(gm: fx.GraphModule, *, options: PassOptions) -> fx.GraphModule:
    """Matches: transitions tagged ``reduce_scatter`` (row output -> sequence region),
    ``all_gather`` (sequence shard -> column input), ``gather`` (sequence shard -> replicated
    consumer, e.g. the LM head) and ``scatter`` (replicated value -> sharded consumer, e.g. the
    embedding output entering the first sequence region).
    Rewrites: inserts the matching :mod:`passes.collectives` node after each producer.
    Requires: ``tag_layouts_pass``. Ensures: every edge into or out of a sequence region
    carries its collective; nothing else changes."""
    insert_transitions(gm, ("reduce_scatter", "all_gather", "gather", "scatter"), options,
                       "insert_sequence_parallel_collectives_pass")
    gm.recompile()
    return gm
