"""Every private PyTorch API the project touches, in one place (minimum torch: 2.7).

``autoseqpar`` imports these from here too, so a torch upgrade that moves one breaks one file.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol  # noqa: F401  (traceable collectives)
from torch.fx.passes.fake_tensor_prop import FakeTensorProp  # noqa: F401
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: F401

MIN_TORCH = (2, 7)


def group_size_by_name(group_name: str) -> int:
    return dist.distributed_c10d._get_group_size_by_name(group_name)


def rank_by_name(group_name: str) -> int:
    """This process's rank in the group (works for a standalone fake group too)."""
    return dist.distributed_c10d._resolve_process_group(group_name).rank()


class FakeGroup:
    """A fake process group of ``size`` ranks, registered by name only: functional collectives
    resolve it, nothing communicates, and no default group is created or touched -- so it
    works with or without ``init_process_group``. Use as a context manager."""

    _count = 0

    def __init__(self, size: int, rank: int = 0):
        from torch._C._distributed_c10d import FakeProcessGroup, ProcessGroup

        FakeGroup._count += 1
        self.group_name = f"autoseqpar_fake_{size}_{FakeGroup._count}"
        pg = ProcessGroup(fake_process_group_store(), rank, size)
        backend = FakeProcessGroup._create_internal(rank, size)
        pg._register_backend(torch.device("cpu"), ProcessGroup.BackendType.CUSTOM, backend)
        pg._register_backend(torch.device("cuda"), ProcessGroup.BackendType.CUSTOM, backend)
        pg._set_default_backend(ProcessGroup.BackendType.CUSTOM)
        pg._set_group_name(self.group_name)
        self.group = pg

    def __enter__(self):
        from torch._C._distributed_c10d import _register_process_group
        _register_process_group(self.group_name, self.group)
        return self.group

    def __exit__(self, *exc):
        from torch._C._distributed_c10d import _unregister_process_group
        _unregister_process_group(self.group_name)
        return False


def fake_like(mode, t: torch.Tensor, device, requires_grad: bool = False) -> torch.Tensor:
    """A FakeTensor of ``mode`` with ``t``'s shape, strides and dtype on ``device``: no
    memory (a meta tensor's fake on the CPU, for one)."""
    with mode:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device,
                                   requires_grad=requires_grad)


def fake_process_group_store():
    """The fake process group of torch's test utilities: one process plays a whole group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    return FakeStore()


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def extract_fwd_bwd_modules(joint_module, saved_values, num_fwd_outputs: int):
    """AOTAutograd's own split of a joint graph, given the values the backward reads."""
    from torch._functorch.partitioners import _extract_fwd_bwd_modules
    return _extract_fwd_bwd_modules(joint_module, saved_values, [],
                                    num_fwd_outputs=num_fwd_outputs)


def aot_module(gm, example_args, partition_fn, fw_compiler=None, bw_compiler=None):
    """``aot_module_simplified`` with a custom partition function (boxed eager by default)."""
    from functorch.compile import aot_module_simplified, make_boxed_func

    def boxed(g, _inputs):
        return make_boxed_func(g)

    return aot_module_simplified(gm, example_args, fw_compiler=fw_compiler or boxed,
                                 bw_compiler=bw_compiler or fw_compiler or boxed,
                                 partition_fn=partition_fn)


def inductor_compile(gm, example_args, partition_fn):
    """Inductor's whole pipeline (decompositions, joint-graph passes, codegen for forward and
    backward) with ``partition_fn`` in place of its min-cut partitioner, through inductor's
    ``custom_partitioner_fn`` hook. Returns the compiled callable. Inductor's FX-graph and
    AOTAutograd caches are off for the call: their keys cannot see our policy (a hit would
    reuse another budget's split and skip the partitioner)."""
    import uuid

    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.custom_graph_pass import CustomPartitionerFn

    key = f"autoseqpar-partitioner-{uuid.uuid4()}"

    class Partitioner(CustomPartitionerFn):
        def __call__(self, joint, joint_inputs, **kwargs):
            return partition_fn(joint, joint_inputs, **kwargs)

        def uuid(self):
            return None  # no FX-graph caching

        def __reduce__(self):  # inductor pickles its config for cache keys: a unique stand-in
            return (str, (key,))

    with functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_args, config_patches={
            "custom_partitioner_fn": Partitioner(), "fx_graph_cache": False})


def source_node_name(node):
    """The name of the node of the traced-from graph that produced ``node`` (PyTorch's
    ``from_node`` provenance), or None."""
    src = node.meta.get("from_node")
    return src[0].name if src else None
