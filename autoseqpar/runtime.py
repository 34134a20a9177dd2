"""ParallelModule: the local shards, the rewritten graph, and the collectives users call."""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Callable

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor

from passes._compat import FakeTensor, FakeTensorMode, fake_like
from passes.layout import Shard, shard_tensor, unshard_tensor
from passes.match import META
from passes.rng import mix_seed

from .capture import Captured
from .errors import InputMismatchError


def _mirror(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The container module for ``path`` under ``root`` (created on demand), and the leaf name."""
    *parts, leaf = path.split(".")
    mod = root
    for p in parts:
        child = mod._modules.get(p)
        if child is None:
            child = nn.Module()
            mod.add_module(p, child)
        mod = child
    return mod, leaf


def _make_runner(pm) -> "Callable":
    """A function dynamo keeps as one node (``allow_in_graph``): it runs the compiled graph;
    on fake tensors (dynamo's shape inference) it runs the rewritten graph itself."""
    ref = weakref.ref(pm)

    def run_parallel_module(*graph_args):
        mod = ref()
        if any(isinstance(a, FakeTensor) for a in graph_args):
            return tuple(mod._gm(*graph_args))
        return tuple(mod._compiled(*graph_args))

    run_parallel_module.parallel_module = ref
    return torch.compiler.allow_in_graph(run_parallel_module)


class ParallelModule(nn.Module):
    """A model made tensor- and sequence-parallel by :func:`autoseqpar.transform`.

    Called exactly like the original with the same full inputs on every rank; returns the same
    output structure with full tensors. Its parameters (under ``.module``, named like the
    original's) are this rank's shards: build the optimizer on ``pmodel.parameters()``.
    """

    def __init__(self, model: nn.Module, captured: Captured, gm: fx.GraphModule, plan,
                 options, group, pass_log, fake: bool = False):
        super().__init__()
        self.group = group
        self.tp = group.size()
        self.rank = group.rank()
        # explain: parameters, buffers and the traced example are FakeTensors (shapes only,
        # no memory; the module is never run)
        self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
        self.options = options
        self.pass_log = pass_log
        self.model_name = type(model).__name__
        self._captured = captured
        self._plan = plan
        self._gm = gm
        self.module = nn.Module()
        self._shards: dict = {}  # fqn -> Shard for sharded parameters
        self._state_keys = tuple(model.state_dict().keys())
        self._param_names = tuple(n for n, _ in model.named_parameters())
        self._build_parameters(model, gm)
        self._seed = options.seed if options.seed is not None else torch.initial_seed()
        self._step = 0
        self.train(captured.training)
        self.partitions: list = []  # PartitionRecord of each AOTAutograd partition
        self._compiled = self._compile()
        self._runner = _make_runner(self)

    def _compile(self):
        opts = self.options
        return self.compile_graph(recompute=opts.recompute, memory_budget=opts.memory_budget,
                                  max_overhead=opts.max_overhead, hardware=opts.hardware,
                                  inner=opts.compiler)

    def compile_graph(self, *, recompute, memory_budget, max_overhead, hardware, inner,
                      records=None):
        """Trace the rewritten graph forward+backward with AOTAutograd, partition it with the
        recompute solver under these options, compile both halves with ``inner``. Returns the
        compiled callable (the graph's placeholders in, its outputs out). The partition's record
        goes to ``self.partitions`` and, when given, to ``records`` too (a backend's)."""
        from .backend import compile_joint
        from .cost_model import default_hardware
        from .errors import MemoryBudgetError
        from .partition import graph_facts, make_partition_fn, make_policy
        from .solver import InfeasibleBudget

        facts = graph_facts(self._gm)
        policy = make_policy(recompute, memory_budget, facts, max_overhead)
        device = next(iter(self.parameters()), torch.empty(0)).device
        self.hardware = default_hardware(hardware, device)
        fn = make_partition_fn(policy, self.hardware, facts, self.partitions)
        first = len(self.partitions)
        leaves = [self._on_device(x) if isinstance(x, torch.Tensor) else x
                  for x in self._captured.example_leaves]
        args = self._graph_args(leaves, self._on_device(torch.zeros(2, dtype=torch.int64)))
        try:
            compiled = compile_joint(self._gm, args, fn, inner)
        except Exception as e:
            cause = e
            while cause is not None and not isinstance(cause, InfeasibleBudget):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise MemoryBudgetError(
                f"memory_budget={memory_budget!r} is infeasible: {cause}. The smallest "
                f"reachable is {cause.minimum} bytes of saved activations per rank (every layer "
                "recomputed from its input); raise the budget to at least that.",
                cause.minimum) from e
        if records is not None:
            records.extend(self.partitions[first:])
        return compiled

    # ----------------------------------------------------------------- construction
    def _build_parameters(self, model: nn.Module, gm: fx.GraphModule) -> None:
        full_params = dict(model.named_parameters(remove_duplicate=False))
        full_buffers = dict(model.named_buffers(remove_duplicate=False))
        made: dict = {}
        for n in gm.graph.nodes:
            meta = n.meta.get(META, {})
            if n.op != "placeholder" or meta.get("kind") not in ("param", "buffer"):
                continue
            fqn = meta["fqn"]
            src_name = self._captured.tied.get(fqn, fqn)
            if meta["kind"] == "param":
                full = full_params[fqn]
                spec = meta.get("shard")
                with torch.no_grad(), self._fake_mode or contextlib.nullcontext():
                    local = shard_tensor(self._on_device(full.detach()), spec, self.rank,
                                         self.tp).clone()
                if isinstance(spec, Shard):
                    self._shards[fqn] = spec
                    self._shards[src_name] = spec
                param = made.get(src_name)
                if param is None:
                    param = made[src_name] = nn.Parameter(local, requires_grad=full.requires_grad)
                mod, leaf = _mirror(self.module, fqn)
                mod.register_parameter(leaf, param)
            else:
                mod, leaf = _mirror(self.module, fqn)
                mod.register_buffer(leaf, self._on_device(full_buffers[fqn].detach()).clone())
        # tied names the graph did not use still point at the same local parameter
        for fqn, src in self._captured.tied.items():
            if src in made and fqn not in made:
                mod, leaf = _mirror(self.module, fqn)
                if leaf not in mod._parameters:
                    mod.register_parameter(leaf, made[src])

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        if self._fake_mode is None:
            return t
        if t.device.type == "meta":  # a model built on meta: fake CPU tensors, as captured
            return fake_like(self._fake_mode, t, "cpu", t.requires_grad)
        return self._fake_mode.from_tensor(t)

    # ------------------------------------------------------------------------- call
    def _flatten_call(self, args, kwargs) -> list:
        cap = self._captured
        kwargs = {**kwargs, **cap.injected}
        missing = [k for k in cap.kwarg_order if k not in kwargs]
        extra = [k for k in kwargs if k not in cap.kwarg_order]
        if missing or extra:
            raise InputMismatchError(
                f"the module was built for keyword arguments {list(cap.kwarg_order)}; this call "
                f"is missing {missing} and adds {extra}. Transform again with example inputs of "
                "the structure you call with.")
        kwargs = {k: kwargs[k] for k in cap.kwarg_order}
        leaves, spec = pytree.tree_flatten((tuple(args), kwargs))
        if spec != cap.in_spec:
            raise InputMismatchError(
                f"call structure {spec} differs from the example inputs' {cap.in_spec}")
        for i, (got, want) in enumerate(zip(leaves, cap.example_leaves)):
            if isinstance(want, torch.Tensor):
                if not isinstance(got, torch.Tensor) or got.shape != want.shape or \
                        got.dtype != want.dtype:
                    desc = (f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor)
                            else type(got).__name__)
                    raise InputMismatchError(
                        f"input {i} is {desc} but the module was built for "
                        f"{tuple(want.shape)} {want.dtype}: shapes are fixed at transform time "
                        "(the sharding depends on them); transform again for this shape.")
            elif got != want:
                raise InputMismatchError(f"input {i} is {got!r}; the module was built for "
                                         f"{want!r}")
        return leaves

    def _graph_args(self, leaves: list, seeds: torch.Tensor) -> list:
        """The rewritten graph's inputs in placeholder order."""
        params = dict(self.module.named_parameters(remove_duplicate=False))
        buffers = dict(self.module.named_buffers())
        out = []
        for n in self._gm.graph.nodes:
            if n.op != "placeholder":
                continue
            meta = n.meta.get(META, {})
            kind = meta.get("kind")
            if kind == "param":
                out.append(params[meta["fqn"]])
            elif kind == "buffer":
                out.append(buffers[meta["fqn"]])
            elif kind == "constant":
                out.append(self._on_device(self._captured.constants[n.name]))
            elif kind == "seeds":
                out.append(seeds)
            else:
                out.append(leaves[meta["leaf"]])
        return out

    def forward(self, *args, **kwargs):
        out = self.run_graph(*self._prepare(args, kwargs))
        return pytree.tree_unflatten(list(out), self._captured.out_spec)

    @torch.compiler.disable
    def _prepare(self, args, kwargs) -> list:
        """Check the call, draw this step's dropout seeds: the graph's inputs. Outside any
        torch.compile graph (the seeds change every step and must not become a constant)."""
        if self._fake_mode is not None:
            raise InputMismatchError("this module was built by autoseqpar.explain on fake "
                                     "tensors (shapes only); call autoseqpar.transform to run")
        return self._graph_args(self._flatten_call(args, kwargs), self.dropout_seeds())

    @property
    def run_graph(self):
        """The rewritten graph as one opaque call: what ``torch.compile`` records for this
        module (so the autoseqpar backend finds it and compiles it on the module's own graph)."""
        return self._runner

    def dropout_seeds(self) -> torch.Tensor:
        """This step's dropout seeds: [per-rank stream, group-wide stream]. Each forward call
        is a new step; the same ``seed`` gives the same sequence of masks run to run."""
        self._step += 1
        return torch.tensor([mix_seed(self._seed, 1 + self.rank, self._step),
                             mix_seed(self._seed, 0, self._step)], dtype=torch.int64)

    def train(self, mode: bool = True):
        if mode != self._captured.training:
            want, have = ("training", "eval") if mode else ("eval", "training")
            raise InputMismatchError(
                f"the module was captured in {have} mode and cannot switch to {want} mode: call "
                f"model.{'train' if mode else 'eval'}() before autoseqpar.transform, or transform "
                "once per mode")
        return super().train(mode)

    # ------------------------------------------------------------------ collectives
    def _full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        if isinstance(local, DTensor):  # sharded again over data parallel (FSDP2 fully_shard)
            local = local.full_tensor()
        spec = self._shards.get(name)
        if spec is None:
            return local.detach().clone()
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local.detach().contiguous(), group=self.group)
        return unshard_tensor(parts, spec)

    def gather_state_dict(self) -> dict:
        """The full state dict, keys and shapes of the original ``model.state_dict()``.
        A collective: every rank of the group must call it."""
        local = self.module.state_dict(keep_vars=True)
        return {k: self._full(k, local[k]) for k in self._state_keys}

    def gather_grads(self) -> dict:
        """``{name: full gradient}`` keyed like the original ``model.named_parameters()``
        (None where no gradient). A collective: every rank must call it."""
        params = dict(self.module.named_parameters(remove_duplicate=False))
        out = {}
        for name in self._param_names:
            g = params[name].grad
            has = torch.tensor([g is not None], dtype=torch.int32)
            dist.all_reduce(has, op=dist.ReduceOp.MIN, group=self.group)
            out[name] = self._full(name, g) if bool(has.item()) else None
        return out

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip gradients by the true global norm: sharded gradients summed over the group,
        replicated ones (identical on every rank) counted once. Gradients sharded again over
        data parallel (FSDP2's DTensors) are summed over their data-parallel group too; under
        DDP they are already identical across it. Returns the total norm. A collective."""
        sharded, replicated, dp_groups = [], [], {}
        for name, p in self.module.named_parameters():
            g = p.grad
            if g is None:
                continue
            if isinstance(g, DTensor):
                for group in g.device_mesh.get_all_groups():
                    dp_groups[group.group_name] = group
                g = g.to_local()
            (sharded if name in self._shards else replicated).append(g)
        dev = next(self.parameters()).device
        if math.isinf(norm_type):
            vals = [g.abs().max() for g in sharded + replicated] or [torch.zeros((), device=dev)]
            total = torch.stack(vals).max().float()
            for group in (*dp_groups.values(), self.group):
                dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
        else:
            s = sum((g.float().norm(norm_type) ** norm_type for g in sharded),
                    torch.zeros((), device=dev))
            r = sum((g.float().norm(norm_type) ** norm_type for g in replicated),
                    torch.zeros((), device=dev))
            both = torch.stack([s, r])
            for group in dp_groups.values():
                dist.all_reduce(both, group=group)
            s, r = both[0].clone(), both[1]
            dist.all_reduce(s, group=self.group)
            total = (s + r) ** (1.0 / norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in sharded + replicated:
            g.mul_(coef.to(g.dtype))
        return total

    # ------------------------------------------------------------------ inspection
    @property
    def graph(self) -> fx.GraphModule:
        """The rewritten forward graph; ``print(pmodel.graph)`` shows each decision as a comment."""
        from .report import AnnotatedGraphModule, recompute_notes
        notes = recompute_notes(self.partitions[-1]) if self.partitions else {}
        return AnnotatedGraphModule.wrap(self._gm, self.tp, notes)

    @property
    def plan(self) -> dict:
        """The detected layout keyed by module path, diffable against a DTensor plan."""
        from .report import plan_dict
        return plan_dict(self._gm, self._plan)

    def report(self):
        """A :class:`autoseqpar.report.Report`: ``print(pmodel.report())`` for the tables,
        ``.saved_activations()``, ``.to_dict()``, ``.plot(path)``."""
        from .report import Report
        return Report.of(self)
