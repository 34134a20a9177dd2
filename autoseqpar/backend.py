"""``autoseqpar.backend``: the recompute solver as a ``torch.compile`` backend, for any model.

    torch.compile(model, backend=autoseqpar.backend(memory_budget=0.5))

No process group is needed: each graph dynamo hands over is traced jointly by AOTAutograd and
partitioned by :mod:`autoseqpar.partition` -- the dropout-safe, budget-respecting alternative to
``torch._functorch.config.activation_memory_budget`` (random ops without replay are never
recomputed, so their masks are kept). What each graph saved is in ``backend.partitions``.
(The sharded ``ParallelModule`` path and ``inner="inductor"`` are issue 4's next steps.)
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.fx as fx

from passes._compat import aot_module

from .cost_model import hardware as resolve_hardware
from .errors import ConfigError
from .partition import RECOMPUTE_OPTIONS, graph_facts, make_partition_fn, make_policy


def _activation_free_inputs(gm: fx.GraphModule, example_inputs) -> frozenset:
    """1-based positions of the graph inputs that are parameters or buffers (dynamo lifts a
    module's attributes as ``l_self_...`` inputs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return frozenset(i + 1 for i, (n, ex) in enumerate(zip(placeholders, example_inputs))
                     if isinstance(ex, torch.nn.Parameter) or n.name.startswith("l_self_"))


def _inner(inner) -> Callable:
    from functorch.compile import make_boxed_func

    if inner == "eager":
        return lambda g, _inputs: make_boxed_func(g)
    if callable(inner):
        return lambda g, inputs: make_boxed_func(inner(g, inputs))
    raise ConfigError(f"inner={inner!r}: give 'eager' or a callable (gm, example_inputs) -> "
                      "callable that compiles a forward or backward graph")


def backend(*, recompute: str = "auto", memory_budget: Optional[Union[int, float]] = None,
            max_overhead: float = 0.03, hardware=None, inner="eager") -> Callable:
    """A ``torch.compile`` backend that partitions forward and backward with autoseqpar's
    recompute solver. Options as in :class:`autoseqpar.Options`."""
    if recompute not in RECOMPUTE_OPTIONS:
        raise ConfigError(f"recompute={recompute!r}; choose one of {RECOMPUTE_OPTIONS}")
    compile_fn = _inner(inner)
    records: list = []

    def compile_graph(gm: fx.GraphModule, example_inputs):
        facts = graph_facts(gm, constant_primals=_activation_free_inputs(gm, example_inputs))
        policy = make_policy(recompute, memory_budget, facts, max_overhead)
        device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)),
                      torch.device("cpu"))
        hw = resolve_hardware(hardware or ("h100" if device.type == "cuda" else "cpu"))
        partition_fn = make_partition_fn(policy, hw, facts, records)
        return aot_module(gm, example_inputs, partition_fn, fw_compiler=compile_fn)

    compile_graph.partitions = records
    return compile_graph
