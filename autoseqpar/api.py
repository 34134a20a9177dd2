"""``transform``: the user's entry point."""
from __future__ import annotations

import torch
import torch.distributed as dist

from passes.match import META
from passes.options import PassOptions

from .capture import capture, retarget_device
from .config import Options
from .errors import DivisibilityError, NoParallelStructureError, ProcessGroupError
from .pipeline import run_passes
from .runtime import ParallelModule


def _resolve_group(tp, group):
    if not dist.is_available() or not dist.is_initialized():
        raise ProcessGroupError(
            "no process group is initialized: call torch.distributed.init_process_group(...) "
            "on every rank (e.g. under torchrun) before autoseqpar.transform")
    group = group if group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    if tp is None:
        tp = size
    if tp != size:
        raise ProcessGroupError(
            f"tp={tp} but the process group has {size} ranks: tensor parallelism runs over the "
            f"whole group; pass tp={size}, or a group of {tp} ranks as group=")
    return tp, group


def _check_sequence(captured, tp: int, seq_dim: int) -> None:
    for leaf in captured.example_leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > seq_dim:
            s = leaf.shape[seq_dim]
            if s % tp:
                raise DivisibilityError(
                    f"sequence length {s} (dimension {seq_dim} of the inputs) is not divisible "
                    f"by tp={tp}: sequence parallelism gives each rank s/tp tokens; pad the "
                    f"sequence to a multiple of {tp} or pass sequence_parallel=False")
            return


def _check_plan(gm, tp: int) -> None:
    plan = gm.meta["autoseqpar_plan"]
    bad = [r for r in plan.tp.rejected if r.kind == "divisibility"]
    if bad:
        lines = "; ".join(f"{_fqn(gm, r.node)}: {r.reason}" for r in bad[:4])
        raise DivisibilityError(
            f"cannot split over tp={tp}: {lines}. The number of attention heads, of KV heads "
            f"(GQA) and the hidden sizes must be divisible by tp={tp}; pick a tp that divides "
            "them")
    if not plan.tp.blocks:
        found = [f"{_fqn(gm, r.node)} ({r.reason} at {r.at})" for r in plan.tp.rejected[:6]]
        raise NoParallelStructureError(
            "no column/row-parallel linear pair was found in the graph"
            + (f"; linears seen but kept replicated: {found}" if found else
               "; it has no linear layer with its own weight"))


def _fqn(gm, node_name: str) -> str:
    from passes.propagate import matmul_roles
    for n in gm.graph.nodes:
        if n.name == node_name:
            roles = matmul_roles(n)
            if roles:
                return roles[1].meta.get(META, {}).get("fqn", node_name).rsplit(".", 1)[0]
    return node_name


def build(model: torch.nn.Module, example_inputs, tp: int, group, opts: Options, *,
          fake: bool = False) -> ParallelModule:
    """Capture, check, rewrite and partition: what ``transform`` and ``explain`` share.
    ``fake=True`` builds the shards and traces the joint graph on FakeTensors (no memory,
    not runnable: ``explain``)."""
    captured = capture(model, example_inputs)
    if fake and any(p.device.type == "meta" for p in model.parameters()):
        retarget_device(captured.gm, "meta", "cpu")
    if opts.sequence_parallel:
        _check_sequence(captured, tp, opts.seq_dim)
    popts = PassOptions(tp=tp, group_name=group.group_name,
                        sequence_parallel=opts.sequence_parallel, seq_dim=opts.seq_dim)
    gm, log = run_passes(captured.gm, popts, check_after="tag_layouts_pass", check=_check_plan)
    return ParallelModule(model, captured, gm, gm.meta["autoseqpar_plan"], opts, group, log,
                          fake=fake)


def transform(model: torch.nn.Module, example_inputs, *, tp: int | None = None, group=None,
              sequence_parallel: bool = True, **options) -> ParallelModule:
    """Make ``model`` tensor-parallel (and sequence-parallel) over ``group``.

    Call on every rank after ``torch.distributed.init_process_group``, with the same full
    ``example_inputs`` (a tuple of positional args, a dict of keyword args, or ``(args,
    kwargs)``). Returns a :class:`ParallelModule` called exactly like ``model``. ``model``
    itself is not modified.
    """
    opts = Options.make(sequence_parallel=sequence_parallel, **options)
    tp, group = _resolve_group(tp, group)
    return build(model, example_inputs, tp, group, opts)
