"""Layouts of values across the tensor-parallel group, and the tensor helpers that realise them.

A value of the traced graph is, on each of the ``t`` ranks of the group, one of:

* ``Replicate()``: the full tensor, identical on every rank. By the project's convention its
  gradient is also full and identical on every rank.
* ``Shard(dim, blocks, kind)``: rank ``r`` holds part of dimension ``dim``. The dimension is read
  as ``blocks`` equal consecutive blocks, each cut into ``t`` contiguous chunks; rank ``r`` holds
  chunk ``r`` of every block, concatenated. ``blocks == 1`` is the plain contiguous shard; a fused
  QKV output of width ``3h`` is ``blocks=3`` so that each rank owns its own q, k and v heads; a
  token dimension flattened from ``(b, s)`` with ``s`` sharded is ``blocks=b``. ``kind`` says
  why the value is split: ``"tp"`` (heads / hidden features) or ``"seq"`` (tokens).
* ``Partial()``: every rank holds a summand of the full value (a row-parallel matmul's output).

The helpers here slice and reassemble real tensors by a ``Shard``; the runtime uses them for
parameters and the collectives in :mod:`passes.collectives` use them for activations, so there
is exactly one definition of which elements a rank owns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    def __str__(self) -> str:
        return "P"


@dataclass(frozen=True)
class Shard:
    dim: int
    blocks: int = 1
    kind: str = "tp"

    def __str__(self) -> str:
        b = f"x{self.blocks}" if self.blocks != 1 else ""
        return f"S({self.dim}{b},{self.kind})"

    def with_kind(self, kind: str) -> "Shard":
        return Shard(self.dim, self.blocks, kind)


Layout = Union[Replicate, Partial, Shard]
REPLICATE = Replicate()
PARTIAL = Partial()


def local_shape(shape, spec: Layout, t: int) -> list[int]:
    """The per-rank shape of a value of global ``shape`` laid out as ``spec``."""
    shape = list(shape)
    if isinstance(spec, Shard):
        size = shape[spec.dim]
        if size % (spec.blocks * t):
            raise ValueError(f"dimension {spec.dim} of size {size} does not split into "
                             f"{spec.blocks} block(s) x {t} ranks")
        shape[spec.dim] = size // t
    return shape


def _split_view(x: torch.Tensor, dim: int, blocks: int, t: int) -> torch.Tensor:
    """View ``dim`` as ``(blocks, t, chunk)``."""
    dim = dim % x.dim()
    return x.unflatten(dim, (blocks, t, -1))


def shard_tensor(full: torch.Tensor, spec: Layout, rank: int, t: int) -> torch.Tensor:
    """Rank ``rank``'s part of ``full`` under ``spec`` (a contiguous copy for shards)."""
    if not isinstance(spec, Shard):
        return full
    dim = spec.dim % full.dim()
    return _split_view(full, dim, spec.blocks, t).select(dim + 1, rank).flatten(dim, dim + 1).contiguous()


def unshard_tensor(parts: list[torch.Tensor], spec: Shard) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from every rank's part, in rank order."""
    dim = spec.dim % parts[0].dim()
    views = [p.unflatten(dim, (spec.blocks, -1)) for p in parts]
    return torch.stack(views, dim=dim + 1).flatten(dim, dim + 2)
