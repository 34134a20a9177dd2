"""model -> aten graph with shapes on every node, parameters and inputs as placeholders.

Capture is ``torch.export`` in non-strict mode: it traces HF GPT-2 / Llama / BERT (where
``torch.fx.symbolic_trace`` fails), keeps the ``ModelOutput`` structure in its output spec,
records ``nn_module_stack`` and source lines on every node, and lifts parameters and buffers
into placeholders whose FQNs the graph signature gives. The model is not modified.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from passes._compat import FakeTensor, fake_like
from passes.match import META

from .errors import CaptureError, UnsupportedModelError

# Keyword arguments switched off for training-time capture when the model's forward accepts
# them: a KV cache is useless in training and torch.export refuses HF's DynamicCache output.
TRAINING_KWARGS = {"use_cache": False}


@dataclass
class Captured:
    gm: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    example_leaves: list  # the flattened (args, kwargs) the graph was traced with
    injected: dict  # kwargs autoseqpar added (e.g. use_cache=False)
    kwarg_order: tuple  # keyword names in the order the graph expects them
    tied: dict = field(default_factory=dict)  # fqn -> fqn of the parameter it shares storage with
    constants: dict = field(default_factory=dict)  # lifted constant tensors by placeholder name
    training: bool = True


def _split_inputs(example_inputs):
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and \
            isinstance(example_inputs[1], dict) and isinstance(example_inputs[0], tuple):
        return example_inputs[0], dict(example_inputs[1])
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def _tied_parameters(model: torch.nn.Module) -> dict:
    first: dict = {}
    tied: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def capture(model: torch.nn.Module, example_inputs, kwargs=None) -> Captured:
    """Trace ``model`` on ``example_inputs`` (a tuple of positional args; a dict of keyword args;
    or ``(args, kwargs)``) into an aten graph whose placeholders are tagged param / buffer /
    constant / input."""
    args, kw = _split_inputs(example_inputs)
    kw.update(kwargs or {})
    params = inspect.signature(model.forward).parameters
    injected = {k: v for k, v in TRAINING_KWARGS.items() if k in params and k not in kw}
    kw.update(injected)
    # Fresh copies: export merges inputs that are the same tensor object (input_ids passed again
    # as labels), which would tie them in the graph for every later call.
    args, kw = pytree.tree_map_only(torch.Tensor, lambda x: x.detach().clone(), (args, kw))
    try:
        ep = torch.export.export(model, tuple(args), kw, strict=False)
    except Exception as e:  # export raises many types; the cause is attached
        raise CaptureError(
            f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. autoseqpar needs a model that "
            "torch.export can trace with static shapes (non-strict mode); see the cause.") from e
    return _tag(ep, model, args, kw, injected)


def _tag(ep, model, args, kw, injected) -> Captured:
    from torch.export.graph_signature import InputKind, OutputKind

    gm = ep.graph_module
    kinds = {InputKind.PARAMETER: "param", InputKind.BUFFER: "buffer",
             InputKind.CONSTANT_TENSOR: "constant", InputKind.USER_INPUT: "input"}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    constants = {}
    leaves, _ = pytree.tree_flatten((tuple(args), kw))
    leaf_iter = iter(range(len(leaves)))
    for node, spec in zip(placeholders, ep.graph_signature.input_specs):
        if spec.kind not in kinds:
            raise UnsupportedModelError(f"input {spec.arg.name} of kind {spec.kind.name} is not "
                                        "supported (no custom objects or tokens in the graph)")
        meta = {"kind": kinds[spec.kind], "fqn": spec.target}
        if spec.kind == InputKind.USER_INPUT:
            meta["leaf"] = leaf_index = next(leaf_iter)
            meta["example"] = leaves[leaf_index]
        if spec.kind == InputKind.CONSTANT_TENSOR:
            constants[node.name] = ep.constants[spec.target]
        node.meta[META] = meta
    for spec in ep.graph_signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise UnsupportedModelError(
                f"the model's forward mutates {spec.target} ({spec.kind.name}); autoseqpar needs "
                "a forward without in-place updates of buffers or inputs")
    _inline_constant_inputs(gm)
    tied = _tied_parameters(model)
    for node in placeholders:
        if node.meta[META]["fqn"] in tied or node.meta[META]["fqn"] in tied.values():
            node.meta[META]["tied"] = True
    return Captured(gm, ep.call_spec.in_spec, ep.call_spec.out_spec, leaves, injected,
                    tuple(kw), tied, constants, model.training)


def _inline_constant_inputs(gm: fx.GraphModule) -> None:
    """Non-tensor user inputs (``use_cache=False``, flags) become constants in the graph; the
    runtime still checks every call passes the same value."""
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        meta = node.meta[META]
        if meta["kind"] != "input" or isinstance(meta["example"], torch.Tensor):
            continue
        value = meta["example"]
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
        gm.graph.erase_node(node)
    gm.recompile()


def retarget_device(gm: fx.GraphModule, src: str, dst: str) -> None:
    """Replace the device ``src`` by ``dst`` in every node's arguments (a model built on the
    meta device is captured with ``device="meta"`` in its factory calls; ``explain`` runs it as
    fake CPU tensors so that every kernel choice -- fused attention above all -- is the one a
    real run makes, not the meta device's math fallback)."""
    src_d, dst_d = torch.device(src), torch.device(dst)

    def swap(a):
        return dst_d if isinstance(a, torch.device) and a == src_d else a

    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if n.op == "placeholder" and isinstance(v, FakeTensor) and v.device == src_d:
            n.meta["val"] = fake_like(v.fake_mode, v, dst_d)
        args, kwargs = pytree.tree_map(swap, (n.args, n.kwargs))
        if (args, kwargs) != (n.args, n.kwargs):
            n.args, n.kwargs = args, kwargs
    gm.recompile()
