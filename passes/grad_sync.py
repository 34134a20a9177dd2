"""Sum the gradients of replicated values used by sharded computation, inside the graph."""
from __future__ import annotations

import torch.fx as fx

from .options import PassOptions
from .redistribute import insert_transitions


def sync_replicated_grads_pass(gm: fx.GraphModule, *, options: PassOptions) -> fx.GraphModule:
    """Matches: transitions tagged ``grad_sync``: a replicated operand that may carry a gradient
    (LayerNorm/RMSNorm weights and biases, row-parallel biases) broadcast over a sharded op.
    Rewrites: wraps the operand in :func:`passes.collectives.copy_to_group` at that use (identity
    forward, all-reduce backward). Per use, not per parameter: a tied embedding's replicated use
    (the LM head) keeps its full gradient while a sharded use is summed.
    Requires: ``tag_layouts_pass``. Ensures: every parameter gradient is the full gradient and
    identical on all ranks -- the step Megatron leaves to ``finalize_model_grads``."""
    insert_transitions(gm, ("grad_sync",), options, "sync_replicated_grads_pass")
    gm.recompile()
    return gm
