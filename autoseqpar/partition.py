"""AOTAutograd partition function: recompute policy -> solver decision -> forward/backward graphs.

Decisions are tags first: every forward node of the joint graph gets
``meta["autoseqpar"]["recompute"]`` (``"save"``, ``"recompute"``), and the split is then made by
AOTAutograd's own extraction from the saved values (a separate step that only reads the tags).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch.fx as fx

from passes._compat import extract_fwd_bwd_modules, source_node_name
from passes.match import META, is_metadata_check

from .cost_model import Hardware, collective_name, is_flop_op, storage_root, value_bytes
from .errors import ConfigError
from .solver import Plan, Policy, activation_free, classify, is_free_view, search

RECOMPUTE_OPTIONS = ("auto", "none", "paper", "full")


@dataclass(frozen=True)
class GraphFacts:
    """What the policies need to know about the forward graph the joint was traced from."""
    layer_of: dict  # forward-graph node name -> layer path (or absent)
    attention_core: frozenset  # forward-graph node names of the attention cores
    constant_primals: frozenset  # 1-based placeholder positions of params/buffers/constants
    collectives: frozenset  # forward-graph node names of the inserted collectives
    core_outputs: frozenset = frozenset()  # the last node of each core (.V / fused attention)


def make_policy(recompute: str, budget, facts: GraphFacts, max_overhead: float = 0.03) -> Policy:
    """The solver policy of a ``recompute=`` option (and ``memory_budget=`` in bytes)."""
    src = source_node_name
    if budget is not None:
        if isinstance(budget, float) and 0 < budget <= 1:
            return Policy("budget", budget_fraction=budget)
        if budget <= 0:
            raise ConfigError(f"memory_budget={budget!r}: give bytes per rank (> 0) or a "
                              "fraction in (0, 1] of the no-recompute activation memory")
        return Policy("budget", budget=int(budget))
    if recompute == "auto":
        return Policy("auto", max_overhead=max_overhead)
    movement = lambda n: is_free_view(n) or src(n) in facts.collectives  # noqa: E731
    if recompute == "none":
        # no FLOPs again: only views and the collectives (with the copies that assemble their
        # output): the SP all-gather is re-gathered from the saved shard, as the paper counts
        return Policy("none", allow=movement, memory_first=True)
    if recompute == "paper":
        # QK^T, softmax, dropout are rebuilt; the attention output (the output projection's
        # input) is kept, as in the paper's 34 sbh: the core's last matmul is not rerun.
        core, outs = facts.attention_core, facts.core_outputs

        def last_matmul(n):
            return src(n) in outs and is_flop_op(n)

        return Policy("paper",
                      allow=lambda n: movement(n) or (src(n) in core and not last_matmul(n)),
                      must_recompute=lambda n: src(n) in core and src(n) not in outs,
                      memory_first=True)
    if recompute == "full":
        layers = facts.layer_of
        return Policy("full", must_recompute=lambda n: layers.get(src(n)) is not None,
                      memory_first=True)
    raise ConfigError(f"recompute={recompute!r}; choose one of {RECOMPUTE_OPTIONS} or give "
                      "memory_budget=")


@dataclass
class PartitionRecord:
    """What one partition call decided, for reports and tests."""
    policy: str
    plan: Plan
    saved: list  # (name, shape, dtype, bytes, layer, source node) of each saved activation
    primals_read: int  # parameters / inputs the backward reads (not activation memory)
    fw: fx.GraphModule
    bw: fx.GraphModule
    joint: fx.GraphModule
    seconds: float
    num_fwd_outputs: int
    facts: GraphFacts = None  # what the policy was built from (for re-solving: Pareto curves)
    hw: Hardware = None
    spec: Policy = None  # the policy as solved (budget resolved, constants bound)

    @property
    def saved_bytes(self) -> int:
        return sum(s[3] for s in self.saved)


def make_partition_fn(policy: Policy, hw: Hardware, facts: GraphFacts, records: list) -> Callable:
    layer_key = lambda n: facts.layer_of.get(source_node_name(n))  # noqa: E731

    def partition(joint_module: fx.GraphModule, _joint_inputs, *, num_fwd_outputs: int, **_):
        start = time.perf_counter()
        joint_module.graph.eliminate_dead_code()
        joint_module.recompile()
        joint = classify(joint_module, num_fwd_outputs)
        chosen = replace(policy, constant=activation_free(joint_module, facts.constant_primals))
        if policy.budget_fraction is not None:
            none = replace(make_policy("none", None, facts), constant=chosen.constant)
            reference = search(joint, none, hw, layer_key)
            chosen = replace(chosen, budget=int(policy.budget_fraction * reference.saved_bytes))
        plan = search(joint, chosen, hw, layer_key)
        saved = _with_primals(joint, plan.saved)
        _tag(joint, plan)
        seconds = time.perf_counter() - start
        fw, bw = extract_fwd_bwd_modules(joint_module, saved, num_fwd_outputs)
        drop_dead_code(fw)
        drop_dead_code(bw, backward=True)
        records.append(PartitionRecord(
            policy.name, plan,
            [(n.name, tuple(n.meta["val"].shape), n.meta["val"].dtype, nbytes,
              layer_key(n), source_node_name(n)) for n, nbytes in storage_bytes(plan.saved)],
            sum(1 for n in saved if n.op == "placeholder"), fw, bw, joint_module, seconds,
            num_fwd_outputs, facts, hw, chosen))
        return fw, bw

    return partition


def resolve(record: PartitionRecord, recompute: str = "none", budget=None) -> Plan:
    """Solve ``record``'s joint graph again under another policy (no re-trace, no re-split):
    what the Pareto curve and the report's alternatives are made of."""
    joint = classify(record.joint, record.num_fwd_outputs)
    policy = replace(make_policy(recompute, budget, record.facts, record.spec.max_overhead),
                     constant=record.spec.constant)
    layer_key = lambda n: record.facts.layer_of.get(source_node_name(n))  # noqa: E731
    return search(joint, policy, record.hw, layer_key)


def drop_dead_code(gm: fx.GraphModule, backward: bool = False) -> None:
    """Dead-code elimination in which an unused functional collective and its wait are dead
    too, and so is an unused metadata check (it would keep alive, and re-run, what it checks).
    fx keeps every ``wait_tensor`` (marked side-effecting), and with it the whole forward chain
    behind it that the extraction copied into the backward: matmuls, reduce-scatters and
    all-gathers nothing reads. Every rank drops the same ones (same graph), so collectives stay
    matched across the group. In the backward an unused random op is a leftover of the
    forward too (the solver never recomputes one that draws from the global generator)."""
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: (
        collective_name(n) is None and not is_metadata_check(n)
        and n.is_impure(impure_random=not backward)))
    gm.recompile()


def storage_bytes(saved: list) -> list:
    """(node, bytes) with each storage counted once, on the first saved value that holds it
    (a saved view of a parameter or input costs nothing)."""
    seen: set = set()
    out = []
    for n in saved:
        root = storage_root(n)
        fresh = root not in seen and root.op != "placeholder"
        seen.add(root)
        out.append((n, value_bytes(root) if fresh else 0))
    return out


def _with_primals(joint, saved: list) -> list:
    """Add the primal inputs (parameters, inputs, seeds) that backward or recomputation reads:
    they cost no activation memory but the backward graph needs them as inputs."""
    keep = set(saved)
    primals: dict = {}
    stack = [a for n in joint.backward if n.op != "placeholder" for a in n.all_input_nodes]
    seen: set = set()
    while stack:
        n = stack.pop()
        if n in seen or n in keep or n in joint.backward:
            continue
        seen.add(n)
        if n.op == "placeholder":
            primals[n] = None
        else:
            stack.extend(n.all_input_nodes)
    return [*sorted(primals, key=joint.order.get), *saved]


def _tag(joint, plan: Plan) -> None:
    saved, rec = set(plan.saved), set(plan.recomputed)
    for n in joint.forward:
        n.meta.setdefault(META, {})["recompute"] = (
            "save" if n in saved else "recompute" if n in rec else "forward")


def graph_facts(gm: fx.GraphModule, constant_primals: Optional[frozenset] = None) -> GraphFacts:
    """Layer paths and attention cores of the forward graph (the rewritten one, or the graph
    dynamo hands a backend: then ``constant_primals`` says which inputs are parameters)."""
    from passes.match import find_attention_cores, module_path
    from .solver import layer_of

    layers: dict = {}
    for n in gm.graph.nodes:
        key = layer_of(module_path(n)) if n.meta.get("nn_module_stack") else None
        if key is None:
            key = layers.get(n.meta.get(META, {}).get("source"))
        if key is not None:
            layers[n.name] = key
    plan = gm.meta.get("autoseqpar_plan")
    cores = find_attention_cores(gm, plan.tp) if plan is not None else ()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    constant = constant_primals if constant_primals is not None else frozenset(
        i + 1 for i, n in enumerate(placeholders)
        if n.meta.get(META, {}).get("kind") in ("param", "buffer", "constant"))
    from passes.collectives import FUNCTIONS
    collectives = frozenset(n.name for n in gm.graph.nodes
                            if n.op == "call_function" and n.target in FUNCTIONS.values())
    core = frozenset(x for c in cores for x in c.nodes)
    return GraphFacts(layers, core, constant, collectives,
                      frozenset(c.output for c in cores))
