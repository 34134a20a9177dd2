"""The collectives the passes insert, one function per transition kind of :mod:`passes.plan`.

Each is built on PyTorch's traceable functional collectives (``_functional_collectives``). Where
PyTorch's own autograd formula is the right conjugate (all-gather -> reduce-scatter,
reduce-scatter -> all-gather) it is used as is. Megatron's other pairs (all-reduce with an
identity backward, identity with an all-reduce backward, gather with a take-own-shard backward,
scatter with an all-gather backward) are small ``autograd.Function``s whose forward and backward
call the same functional collectives.

Every function takes ``(x, dim, blocks, group_name)``: ``dim`` and ``blocks`` describe the
:class:`passes.layout.Shard` of the sharded side (see there for ``blocks``).
"""
from __future__ import annotations

import torch

from ._compat import funcol, group_size_by_name as _group_size, rank_by_name as _rank


def _blocked(x: torch.Tensor, dim: int, blocks: int) -> tuple[torch.Tensor, int]:
    dim = dim % x.dim()
    return (x.unflatten(dim, (blocks, -1)), dim + 1) if blocks != 1 else (x, dim)


def _unblocked(y: torch.Tensor, dim: int, blocks: int) -> torch.Tensor:
    dim = dim % (y.dim() - (blocks != 1))
    return y.flatten(dim, dim + 1) if blocks != 1 else y


def _ag(x, dim, blocks, group_name):
    xb, d = _blocked(x.contiguous(), dim, blocks)
    y = funcol.all_gather_single(xb, d, group_name)
    return _unblocked(funcol.wait_tensor(y), dim, blocks)


def _rs(x, dim, blocks, group_name):
    xb, d = _blocked(x.contiguous(), dim, blocks)
    y = funcol.reduce_scatter_single(xb, "sum", d, group_name)
    return _unblocked(funcol.wait_tensor(y), dim, blocks)


def _take_shard(x, dim, blocks, group_name):
    t = _group_size(group_name)
    xb = x.unflatten(dim % x.dim(), (blocks, t, -1))
    return xb.select(dim % x.dim() + 1, _rank(group_name)).flatten(
        dim % x.dim(), dim % x.dim() + 1).contiguous()


def all_gather_seq(x, dim: int, blocks: int, group_name: str):
    """Sequence shard -> full sequence for a column-parallel input (backward: reduce-scatter)."""
    return _ag(x, dim, blocks, group_name)


def reduce_scatter_seq(x, dim: int, blocks: int, group_name: str):
    """Row-parallel partial sums -> summed sequence shard (backward: all-gather)."""
    return _rs(x, dim, blocks, group_name)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, blocks, group_name):
        ctx.args = (dim, blocks, group_name)
        return _ag(x, dim, blocks, group_name)

    @staticmethod
    def backward(ctx, g):
        return _take_shard(g, *ctx.args), None, None, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, blocks, group_name):
        ctx.args = (dim, blocks, group_name)
        return _take_shard(x, dim, blocks, group_name)

    @staticmethod
    def backward(ctx, g):
        return _ag(g, *ctx.args), None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group_name):
        return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group_name))

    @staticmethod
    def backward(ctx, g):
        return g, None


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group_name):
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return funcol.wait_tensor(funcol.all_reduce(g.contiguous(), "sum", ctx.group_name)), None


def gather_seq(x, dim: int, blocks: int, group_name: str):
    """Sequence shard -> full tensor for replicated computation (backward: own shard)."""
    return _Gather.apply(x, dim, blocks, group_name)


def scatter(x, dim: int, blocks: int, group_name: str):
    """Replicated tensor -> this rank's shard (backward: all-gather the shard gradients)."""
    return _Scatter.apply(x, dim, blocks, group_name)


def all_reduce_partial(x, group_name: str):
    """Row-parallel partial sums -> full replicated value (backward: identity)."""
    return _AllReduce.apply(x, group_name)


def copy_to_group(x, group_name: str):
    """Identity; the backward sums the gradient over the group (Megatron's ``f``). Marks a
    replicated value consumed by sharded computation: a column input without SP, or a norm
    weight / bias used on sequence shards."""
    return _CopyToGroup.apply(x, group_name)


FUNCTIONS = {
    "all_gather": all_gather_seq,
    "reduce_scatter": reduce_scatter_seq,
    "gather": gather_seq,
    "scatter": scatter,
    "all_reduce": all_reduce_partial,
    "copy_to_tp": copy_to_group,
    "grad_sync": copy_to_group,
}
