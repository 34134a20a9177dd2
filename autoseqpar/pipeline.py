"""The ordered pass list, each with the reason for its place, and the one runner.

``transform`` and the compile backend both run :data:`PASSES` through :func:`run_passes`.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from passes.grad_sync import sync_replicated_grads_pass
from passes.localize import localize_shapes_pass, propagate_local_shapes_pass
from passes.options import PassOptions
from passes.rng import fork_dropout_rng_pass
from passes.sequence_parallel import insert_sequence_parallel_collectives_pass
from passes.tag import tag_layouts_pass
from passes.tensor_parallel import (insert_tensor_parallel_collectives_pass,
                                    shard_parameters_pass, split_row_bias_pass)

from .errors import AutoSeqParError, PassError

# Each pass's op-count diff at INFO: logging.getLogger("autoseqpar.passes").setLevel("INFO")
# (with a handler), or ``python -m autoseqpar explain ... --log-passes``.
logger = logging.getLogger("autoseqpar.passes")


@dataclass(frozen=True)
class Pass:
    fn: Callable
    why: str

    @property
    def name(self) -> str:
        return self.fn.__name__


PASSES: tuple[Pass, ...] = (
    Pass(split_row_bias_pass, "first: a row-parallel bias must become its own add before "
         "layouts are assigned, so that it lands after the reduction and is added once"),
    Pass(tag_layouts_pass, "the one analysis: every later pass acts on its tags, on global shapes"),
    Pass(shard_parameters_pass, "records how each weight is split; needs the tags only"),
    Pass(insert_tensor_parallel_collectives_pass, "TP all-reduces and copies around each block"),
    Pass(insert_sequence_parallel_collectives_pass, "SP reduce-scatters, all-gathers, scatters "
         "and gathers; before grad sync, whose operands may be gathered values"),
    Pass(sync_replicated_grads_pass, "after the collectives it may wrap"),
    Pass(localize_shapes_pass, "after all insertions, still reading the global meta shapes"),
    Pass(fork_dropout_rng_pass, "after localize: it retargets nodes that localize reads"),
    Pass(propagate_local_shapes_pass, "last: re-derives every shape, checking the rewrite"),
)


@dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    op_diff: dict  # op name -> change in count


def _op_counts(gm: fx.GraphModule) -> collections.Counter:
    return collections.Counter(
        getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
        if n.op == "call_function")


def run_passes(gm: fx.GraphModule, options: PassOptions, passes=PASSES, *,
               check_after: str | None = None, check: Callable | None = None):
    """Apply ``passes`` in order; lint and recompile after each; time each and record its
    op-count diff. On failure, raise :class:`PassError` naming the pass and its predecessor.
    ``check(gm, tp)`` runs once right after the pass named ``check_after`` (to refuse a plan
    with a clear error before any rewrite)."""
    log = []
    prev = "capture"
    for p in passes:
        before = _op_counts(gm)
        start = time.perf_counter()
        try:
            gm = p.fn(gm, options=options)
            gm.graph.lint()
            gm.recompile()
        except AutoSeqParError:
            raise
        except Exception as e:
            raise PassError(f"pass {p.name} failed (it runs after {prev}): "
                            f"{type(e).__name__}: {e}") from e
        after = _op_counts(gm)
        diff = {k: after[k] - before[k] for k in sorted(set(before) | set(after))
                if after[k] != before[k]}
        log.append(PassRecord(p.name, time.perf_counter() - start, diff))
        logger.info("%-44s %7.1f ms  %s", p.name, log[-1].seconds * 1e3,
                    ", ".join(f"{k} {v:+d}" for k, v in diff.items()) or "no op-count change")
        prev = p.name
        if check is not None and p.name == check_after:
            check(gm, options.tp)
    return gm, tuple(log)
