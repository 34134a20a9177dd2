import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402


@pytest.fixture
def fake_group():
    """A fake process group of a chosen size in this process (structure-only tests)."""
    from passes._compat import fake_process_group_store

    def make(world_size: int, rank: int = 0):
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", rank=rank, world_size=world_size,
                                store=fake_process_group_store())
        return dist.group.WORLD

    yield make
    if dist.is_initialized():
        dist.destroy_process_group()
