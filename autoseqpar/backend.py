"""``autoseqpar.backend``: the recompute solver as a ``torch.compile`` backend.

    torch.compile(model, backend=autoseqpar.backend(memory_budget=0.5))
    torch.compile(autoseqpar.transform(model, inputs, tp=2), backend=autoseqpar.backend(inner="inductor"))

On any model (no process group needed) each graph dynamo hands over is traced jointly by
AOTAutograd and partitioned by :mod:`autoseqpar.partition` -- the dropout-safe, budget-respecting
alternative to ``torch._functorch.config.activation_memory_budget`` (random ops without replay
are never recomputed, so their masks are kept). On a :class:`ParallelModule` dynamo sees one call
per module to its rewritten, sharded graph (:meth:`ParallelModule.run_graph`); the backend
compiles that graph -- collectives included -- with the same partitioner, on the module's own
graph and metadata (layers, attention cores), so the decision is the one ``transform`` makes.
Anything else in the same dynamo graph (a loss around the module) runs as traced. Each graph
break is its own graph and is handled the same way. What each graph saved is in
``backend.partitions``.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import torch
import torch.fx as fx

from passes._compat import aot_module, inductor_compile

from .cost_model import default_hardware
from .errors import ConfigError
from .partition import RECOMPUTE_OPTIONS, graph_facts, make_partition_fn, make_policy

INNER = ("eager", "inductor")


def _activation_free_inputs(gm: fx.GraphModule, example_inputs) -> frozenset:
    """1-based positions of the graph inputs that are parameters or buffers (dynamo lifts a
    module's attributes as ``l_self_...`` inputs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return frozenset(i + 1 for i, (n, ex) in enumerate(zip(placeholders, example_inputs))
                     if isinstance(ex, torch.nn.Parameter) or n.name.startswith("l_self_"))


def check_inner(inner) -> None:
    if inner not in INNER and not callable(inner):
        raise ConfigError(f"inner={inner!r}: give 'eager', 'inductor' or a callable (gm, "
                          "example_inputs) -> callable that compiles a forward or backward graph")


def compile_joint(gm: fx.GraphModule, example_args, partition_fn: Callable, inner="eager"):
    """Trace ``gm`` forward+backward, split it with ``partition_fn`` and compile both halves
    with ``inner``: eager (the fx graphs as they are), inductor (its full pipeline, our
    partitioner in place of its own), or a callable ``(gm, example_inputs) -> callable``."""
    from functorch.compile import make_boxed_func

    if inner == "inductor":
        return inductor_compile(gm, example_args, partition_fn)
    fw = None if inner == "eager" else (lambda g, inputs: make_boxed_func(inner(g, inputs)))
    return aot_module(gm, example_args, partition_fn, fw_compiler=fw)


class _Compiled(torch.nn.Module):
    """A ParallelModule's graph as a submodule of dynamo's graph, compiled at its first call:
    at run time, outside dynamo's tracing context, so the shapes are the module's own static
    ones (dynamo may have marked its inputs dynamic)."""

    def __init__(self, build: Callable):
        super().__init__()
        self.build = build
        self.fn = None

    def forward(self, *args):
        if self.fn is None:
            self.fn = self.build()
        return self.fn(*args)


def backend(*, recompute: str = "auto", memory_budget: Optional[Union[int, float]] = None,
            max_overhead: float = 0.03, hardware=None, inner="eager") -> Callable:
    """A ``torch.compile`` backend that partitions forward and backward with autoseqpar's
    recompute solver; options as in :class:`autoseqpar.Options`, ``inner`` as in
    :func:`compile_joint`."""
    if recompute not in RECOMPUTE_OPTIONS:
        raise ConfigError(f"recompute={recompute!r}; choose one of {RECOMPUTE_OPTIONS}")
    check_inner(inner)
    options = dict(recompute=recompute, memory_budget=memory_budget, max_overhead=max_overhead,
                   hardware=hardware)
    records: list = []

    def compile_graph(gm: fx.GraphModule, example_inputs):
        runs = [n for n in gm.graph.nodes
                if n.op == "call_function" and getattr(n.target, "parallel_module", None)]
        if runs:
            for i, n in enumerate(runs):  # each ParallelModule's graph, on its own metadata
                pm = n.target.parallel_module()
                name = f"autoseqpar_compiled_{i}"
                gm.add_submodule(name, _Compiled(functools.partial(
                    pm.compile_graph, inner=inner, records=records, **options)))
                with gm.graph.inserting_before(n):
                    call = gm.graph.call_module(name, n.args, n.kwargs)
                n.replace_all_uses_with(call)
                gm.graph.erase_node(n)
            gm.recompile()
            return gm.forward
        facts = graph_facts(gm, constant_primals=_activation_free_inputs(gm, example_inputs))
        policy = make_policy(recompute, memory_budget, facts, max_overhead)
        device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)),
                      torch.device("cpu"))
        hw = default_hardware(hardware, device)
        return compile_joint(gm, example_inputs, make_partition_fn(policy, hw, facts, records),
                             inner)

    compile_graph.partitions = records
    return compile_graph
