"""Every private PyTorch API the project touches, in one place (minimum torch: 2.7).

``autoseqpar`` imports these from here too, so a torch upgrade that moves one breaks one file.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol  # noqa: F401  (traceable collectives)
from torch.fx.passes.fake_tensor_prop import FakeTensorProp  # noqa: F401
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: F401

MIN_TORCH = (2, 7)


def group_size_by_name(group_name: str) -> int:
    return dist.distributed_c10d._get_group_size_by_name(group_name)


def rank_by_name(group_name: str) -> int:
    group = dist.distributed_c10d._resolve_process_group(group_name)
    return dist.get_rank(group)


def fake_process_group_store():
    """The fake process group of torch's test utilities: one process plays a whole group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    return FakeStore()


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)
