"""The cost model: pure functions of ``node.meta["val"]`` -- bytes, FLOPs, collective bytes, and
a roofline time estimate per node on a small hardware profile.

* bytes: the storage a value keeps alive if it is saved for backward (views: their own numel).
* FLOPs: ``torch.utils.flop_counter``'s registry for matmuls, convolutions and attention;
  one FLOP per output element for elementwise and reduction ops; 0 for views. An op the model
  does not know gets the elementwise fallback and is counted (``unknown_ops``) for the report.
* collective bytes: what one rank sends over the link (ring algorithms): all-gather and
  reduce-scatter move ``(t-1)/t`` of the full tensor, all-reduce twice that.
* time: ``max(FLOPs / peak, bytes moved / memory bandwidth)`` for compute, ``latency + bytes /
  link bandwidth`` for collectives. Time figures are estimates and reports label them so; byte
  and FLOP figures are exact counts from shapes.

Decisions made from these numbers depend only on shapes and the profile -- never on per-rank
timing -- so every rank of a group decides the same thing.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils.flop_counter import (flop_registry, sdpa_backward_flop_count,
                                      sdpa_flop_count, shape_wrapper)

aten = torch.ops.aten


@dataclass(frozen=True)
class Hardware:
    name: str
    flops_16bit: float  # dense bf16/fp16 FLOP/s
    flops_32bit: float  # fp32 FLOP/s (tf32 where the vendor's matmul default uses it)
    mem_bw: float  # bytes/s
    link_bw: float  # bytes/s per rank in the TP group (NVLink; loopback for the CPU)
    link_latency: float  # seconds per collective

    def peak(self, dtype: torch.dtype) -> float:
        return self.flops_16bit if dtype in (torch.bfloat16, torch.float16) else self.flops_32bit


# Vendor datasheet figures (dense, SXM parts); the CPU row is this project's 2-core CI machine,
# measured once with a matmul and a copy loop and fixed here (never re-measured per rank).
HARDWARE = {
    "a100": Hardware("NVIDIA A100-SXM4-80GB", 312e12, 156e12, 2.04e12, 300e9, 10e-6),
    "h100": Hardware("NVIDIA H100-SXM5-80GB", 989e12, 494e12, 3.35e12, 450e9, 8e-6),
    "h200": Hardware("NVIDIA H200-SXM-141GB", 989e12, 494e12, 4.8e12, 450e9, 8e-6),
    "cpu": Hardware("2-core x86 CPU (gloo loopback)", 60e9, 100e9, 12e9, 2e9, 50e-6),
}


def default_hardware(spec, device: torch.device) -> Hardware:
    """``spec`` resolved, or the profile of ``device`` when None (``h100`` on CUDA, else
    ``cpu``)."""
    return hardware(spec or ("h100" if device.type == "cuda" else "cpu"))


def hardware(spec) -> Hardware:
    if isinstance(spec, Hardware):
        return spec
    try:
        return HARDWARE[str(spec).lower()]
    except KeyError:
        raise ValueError(f"unknown hardware {spec!r}; presets: {sorted(HARDWARE)} or a "
                         "Hardware(...)") from None


# ---------------------------------------------------------------------------- bytes

def tensor_bytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(tensor_bytes(x) for x in v)
    return 0


def value_bytes(node: fx.Node) -> int:
    return tensor_bytes(node.meta.get("val"))


# ------------------------------------------------------------------------ op classes

VIEW_OPS = {aten.view, aten._unsafe_view, aten.reshape, aten.expand, aten.t, aten.transpose,
            aten.permute, aten.unsqueeze, aten.squeeze, aten.select, aten.slice, aten.alias,
            aten.as_strided, aten.split, aten.split_with_sizes, aten.unbind, aten.detach,
            aten.view_as, aten.unflatten, aten.flatten, aten.chunk, aten.narrow, aten.diagonal}
ZERO_COST = {aten.empty, aten.zeros, aten.ones, aten.full, aten.arange, aten.scalar_tensor,
             aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like, aten.new_zeros,
             aten.new_ones, aten.new_empty, aten.new_full, aten.empty_strided, aten.sym_size,
             aten._assert_tensor_metadata, aten.lift_fresh_copy}
COLLECTIVE_FACTOR = {"all_gather_into_tensor": "out", "reduce_scatter_tensor": "in",
                     "all_reduce": "allreduce", "all_to_all_single": "in"}


def packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None)


def collective_name(node: fx.Node):
    """The functional-collective op name (``all_gather_into_tensor`` ...), else None."""
    p = packet(node)
    if p is not None and getattr(p, "_qualified_op_name", "").startswith("_c10d_functional::"):
        return p._qualified_op_name.split("::", 1)[1]
    return None


# The CPU's fused attention kernels, which flop_counter has no entry for: the same count as the
# CUDA flash kernels, from the same public formulas. Shape-based, in ``FlopCounterMode``'s
# ``custom_mapping`` format, so eager measurements can count them the same way.
def _cpu_sdpa_flop(q, k, v, *_, out_shape=None, **__) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward_flop(grad_out, q, k, v, *_, out_shape=None, **__) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}
_EXTRA_ON_VALUES = {k: shape_wrapper(f) for k, f in EXTRA_FLOP_FORMULAS.items()}


def flop_formula(p):
    return flop_registry.get(p) or _EXTRA_ON_VALUES.get(p)


def is_collective(node: fx.Node) -> bool:
    """A functional collective op (not its ``wait_tensor``)."""
    return collective_name(node) not in (None, "wait_tensor")


def is_flop_op(node: fx.Node) -> bool:
    """Matmuls, convolutions, attention kernels: the ops with a FLOP formula."""
    return node.op == "call_function" and flop_formula(packet(node)) is not None


def is_view(node: fx.Node) -> bool:
    return node.target is operator.getitem or packet(node) in VIEW_OPS


def group_size_of(node: fx.Node) -> int:
    name = collective_name(node)
    if name == "all_gather_into_tensor":
        return int(node.args[1])
    if name == "reduce_scatter_tensor":
        return int(node.args[2])
    if name in ("all_reduce",):
        from passes._compat import group_size_by_name
        return group_size_by_name(node.args[2])
    return 1


def collective_bytes(node: fx.Node) -> int:
    """Bytes one rank sends for a functional collective node (0 for other nodes)."""
    name = collective_name(node)
    if name not in COLLECTIVE_FACTOR:
        return 0
    t = group_size_of(node)
    if t <= 1:
        return 0
    kind = COLLECTIVE_FACTOR[name]
    if kind == "out":
        full = value_bytes(node)
    else:
        full = tensor_bytes(node.args[0].meta.get("val"))
    factor = 2 if kind == "allreduce" else 1
    return factor * full * (t - 1) // t


ALIASING_MULTI = {aten.split, aten.split_with_sizes, aten.unbind, aten.chunk}


def storage_root(node: fx.Node) -> fx.Node:
    """The node whose storage ``node``'s value lives in: through views (and getitems of
    splits) to the op that allocated it; a placeholder for views of inputs and parameters."""
    n = node
    while True:
        if n.op != "call_function":
            return n
        if n.target is operator.getitem:
            src = n.args[0]
            if packet(src) in ALIASING_MULTI:
                n = src.args[0]
                continue
            return n
        if packet(n) in VIEW_OPS and n.args and isinstance(n.args[0], fx.Node):
            n = n.args[0]
            continue
        return n


def saved_bytes(nodes) -> int:
    """Memory a set of saved values keeps alive: each distinct storage once, at its full size;
    views of parameters and inputs cost nothing (they are alive anyway)."""
    roots = {storage_root(n) for n in nodes}
    return sum(value_bytes(r) for r in roots if r.op != "placeholder")


def _args_vals(node: fx.Node):
    return fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))


@dataclass(frozen=True)
class NodeCost:
    flops: int
    traffic: int  # bytes read + written
    comm: int  # collective bytes sent
    known: bool  # False where the fallback estimate was used


def node_cost(node: fx.Node) -> NodeCost:
    """FLOPs, memory traffic and communication of one call_function node."""
    if node.op != "call_function" or is_view(node) or packet(node) in ZERO_COST:
        return NodeCost(0, 0, 0, True)
    out_bytes = value_bytes(node)
    in_bytes = sum(tensor_bytes(a.meta.get("val")) for a in node.all_input_nodes)
    if collective_name(node) is not None:
        return NodeCost(0, in_bytes + out_bytes, collective_bytes(node), True)
    p = packet(node)
    f = flop_formula(p)
    if f is not None:
        args, kwargs = _args_vals(node)
        try:
            flops = int(f(*args, out_val=node.meta.get("val"), **kwargs))
        except Exception:  # a formula that cannot read this overload's arguments
            flops, known = _elementwise_flops(node), False
        else:
            known = True
        return NodeCost(flops, in_bytes + out_bytes, 0, known)
    known = _is_pointwise_or_reduction(node)
    return NodeCost(_elementwise_flops(node), in_bytes + out_bytes, 0, known)


def _elementwise_flops(node: fx.Node) -> int:
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        v = next((x for x in v if isinstance(x, torch.Tensor)), None)
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    numel = max([x.numel() for x in vals if isinstance(x, torch.Tensor)]
                + ([v.numel()] if isinstance(v, torch.Tensor) else []) + [0])
    return numel


def _is_pointwise_or_reduction(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    if torch.Tag.pointwise in tags or torch.Tag.reduction in tags:
        return True
    name = getattr(packet(node), "__name__", "")
    return any(k in name for k in ("softmax", "norm", "dropout", "gelu", "silu", "backward",
                                   "bernoulli", "rand", "where", "masked_fill", "cat", "copy",
                                   "clone", "convert", "to_copy", "sum", "mean", "pow"))


def dtype_of(node: fx.Node) -> torch.dtype:
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        v = next((x for x in v if isinstance(x, torch.Tensor)), None)
    return v.dtype if isinstance(v, torch.Tensor) else torch.float32


def node_time(node: fx.Node, hw: Hardware) -> float:
    """Roofline estimate of one node's run time in seconds (an estimate, not a measurement)."""
    c = node_cost(node)
    if c.comm:
        return hw.link_latency + c.comm / hw.link_bw
    if collective_name(node) is not None:
        return 0.0
    if not c.flops and not c.traffic:
        return 0.0
    return max(c.flops / hw.peak(dtype_of(node)), c.traffic / hw.mem_bw)


def graph_totals(gm: fx.GraphModule, hw: Hardware) -> dict:
    """Sum of FLOPs, collective bytes and estimated time over a graph; the unknown ops."""
    flops = comm = 0
    time = 0.0
    unknown: dict = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        c = node_cost(n)
        flops += c.flops
        comm += c.comm
        time += node_time(n, hw)
        if not c.known:
            key = str(n.target)
            unknown[key] = unknown.get(key, 0) + 1
    return {"flops": flops, "comm_bytes": comm, "time_estimate": time, "unknown_ops": unknown}
