"""The recompute solver: which forward values the backward reads from memory, which it rebuilds.

The problem
    In the joint forward+backward graph (AOTAutograd), every forward value ``v`` that a backward
    op reads is either *saved* -- kept alive from the end of forward into backward, costing
    ``bytes(v)`` -- or *recomputed* in backward from values available there, costing its run
    time. Primals (parameters, inputs, dropout seeds) are available at no cost.

The flow network (:func:`build_network`)
    A minimum s-t cut ("project selection"). For each forward node ``v`` that backward may need:

    * ``source -> v``: capacity = recompute cost of ``v`` (seconds, the roofline estimate of
      :mod:`autoseqpar.cost_model`), infinite when ``v`` may not be recomputed
      (:func:`banned_from_recompute`: random ops without replay, ops the policy forbids). Cut
      exactly when ``v`` is recomputed (``v`` on the sink side).
    * ``v -> v'``: capacity = ``λ · bytes(v)``, infinite when ``v`` must not be kept (the policy's
      ``must_recompute``, multi-output nodes). Cut exactly when ``v`` is computed in forward
      only but needed in backward: ``v`` is saved.
    * ``v' -> u`` (infinite) for each forward user ``u``; ``v' -> sink`` (infinite) when a
      backward node reads ``v``. So a recomputed node's inputs are saved or recomputed in turn.

    Every finite cut is a valid plan; its capacity is ``recompute time + λ · saved bytes``, and
    the minimum cut (:func:`solve_at`, networkx) is the best plan at that ``λ``.

Collectives may be recomputed (the sequence-parallel all-gather: save the local shard, gather
again in backward -- Megatron's choice), priced by their link time. Decisions depend only on
shapes, the graph and the hardware profile, so every rank of a group makes the same ones.

The trade-off (:func:`search`)
    ``λ`` converts bytes into seconds. ``λ = 0`` saves everything, ``λ = ∞`` recomputes all it
    may. :func:`search` sweeps ``log λ`` (then bisects next to the best point):

    * ``budget`` (bytes): the least recompute whose plan saves at most the budget; when even the
      ``λ = ∞`` plan saves more, :class:`InfeasibleBudget` carries the minimum reachable.
    * ``max_overhead`` (default 3%): the least memory whose recompute adds at most that fraction
      of the estimated step time, and of the step's FLOPs.
    * ``memory_first``: ``λ = ∞`` (used by the ``none``, ``paper`` and ``full`` policies, whose
      allowed recompute is fixed and whose aim is the least memory).

    Between two cuts either side of the constraint, :func:`autoseqpar.refine.mix` takes the more aggressive
    cut layer by layer for as many layers as the constraint allows, and :func:`autoseqpar.refine.allocate`
    lets each layer take any decision the sweep made for it (a greedy multiple-choice
    knapsack over layers). On graphs of at most
    ``LOCAL_SEARCH_NODES`` relevant nodes the cut is made on the whole graph and then polished
    under the exact constraint (:mod:`autoseqpar.refine`): one save added (budget), or
    dropped (overhead allowance), at a time. ``autoseqpar.ilp``
    is the exact reference the tests hold this to (within 5%).

Bytes (:func:`autoseqpar.cost_model.saved_bytes`)
    A saved view keeps its whole base storage alive, so a value's bytes are its storage's, each
    storage is counted once in a plan, and views of parameters or inputs cost nothing.

Repeated layers (:func:`group_layers`)
    Forward nodes are grouped by transformer layer (the ``.N`` of their module path, as a hint
    only) and each layer gets a structural signature (ops, shapes and local wiring). Layers with
    equal signatures form a class; one representative per class is solved, with values from
    other layers as external inputs that may be saved but not recomputed, and the decision is
    mapped by position onto every layer of the class. Solve time grows with the number of
    distinct layer classes, not with depth.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Callable, Optional

import networkx as nx
import torch
import torch.fx as fx

from .cost_model import (ZERO_COST, Hardware, collective_name, is_view, node_cost, node_time,
                         packet, saved_bytes, storage_root, value_bytes)

aten = torch.ops.aten
INF_SCALE = 1e12  # capacities are integers in picoseconds (and λ·bytes in the same unit)
MEMORY_FIRST = 10**18  # per byte at λ = ∞: more than any plan's total recompute picoseconds


class InfeasibleBudget(Exception):
    def __init__(self, budget: int, minimum: int):
        super().__init__(f"a budget of {budget} bytes is below the {minimum} bytes the most "
                         "aggressive recompute plan still saves")
        self.budget, self.minimum = budget, minimum


# ------------------------------------------------------------------------------ policy

@dataclass(frozen=True)
class Policy:
    """What may be recomputed and what the search aims at.

    allow: predicate on a forward node: may it be recomputed (beyond the hard bans)?
    must_recompute: predicate: a node that must not be saved.
    memory_first / budget / max_overhead: see the module docstring."""
    name: str
    allow: Callable = lambda n: True
    must_recompute: Callable = lambda n: False
    constant: Callable = lambda n: False  # activation-free nodes (see activation_free)
    memory_first: bool = False
    budget: Optional[int] = None
    budget_fraction: Optional[float] = None  # of the "none" plan's bytes, resolved per graph
    max_overhead: float = 0.03


def is_free_view(n: fx.Node) -> bool:
    """Views and constant factories: recomputing them costs nothing."""
    return is_view(n) or packet(n) in ZERO_COST or collective_name(n) == "wait_tensor"


def activation_free(joint_gm: fx.GraphModule, constant_primals: frozenset) -> Callable:
    """A predicate: does a node depend on no activation -- only on parameters, buffers and
    constants (a causal mask, rotary tables)? Recomputing such a node rebuilds no activation,
    so every policy may. ``constant_primals`` are the 1-based indices of those primals."""
    memo: dict = {}
    for n in joint_gm.graph.nodes:
        if n.op == "placeholder":
            idx = n.name.rsplit("_", 1)[-1]
            memo[n] = n.name.startswith("primals_") and idx.isdigit() and \
                int(idx) in constant_primals
        elif n.op == "call_function":
            memo[n] = all(memo.get(a, False) for a in n.all_input_nodes)
    return lambda n: memo.get(n, False)


RANDOM = {aten.native_dropout, aten.bernoulli, aten.rand, aten.rand_like, aten.randn,
          aten.randn_like, aten.randint, aten.randint_like, aten.normal, aten.uniform,
          aten.randperm, aten.multinomial, aten.exponential, aten.geometric,
          aten.log_normal, aten.cauchy}


def recomputable(n: fx.Node, policy: Policy) -> bool:
    """May backward run ``n`` again? Not a banned op, and the policy allows it (or it is built
    from parameters and constants alone)."""
    return not banned_from_recompute(n) and (policy.allow(n) or policy.constant(n))


def saveable(n: fx.Node, policy: Policy) -> bool:
    """May ``n`` be kept for backward? Not a multi-output node (its outputs are saved
    instead), and not one the policy rebuilds -- unless nothing can rebuild it."""
    if isinstance(n.meta.get("val"), (tuple, list)):
        return False
    return not policy.must_recompute(n) or must_save(n)


def must_save(n: fx.Node) -> bool:
    """A value that cannot be rebuilt (a banned op's output): it is saved whatever the policy
    asks (``full`` over a fused attention with dropout keeps that output)."""
    if n.target is operator.getitem:
        n = n.args[0]
    return banned_from_recompute(n)


def banned_from_recompute(n: fx.Node) -> bool:
    """Random ops whose numbers would differ on recompute (autoseqpar's own dropout mask is a
    pure function of its seed and is not banned) and ops with side effects."""
    p = packet(n)
    if p in RANDOM:
        return True
    schema = getattr(n.target, "_schema", None)
    if schema is not None and any(a.name == "dropout_p" for a in schema.arguments):
        # a fused attention kernel drawing its own dropout mask: no replay on recompute
        from passes.propagate import named_args
        if named_args(n).get("dropout_p", 0.0):
            return True
    if getattr(n.target, "is_view", False) is False and isinstance(getattr(n.target, "_schema", None), torch.FunctionSchema):
        if n.target._schema.is_mutable:
            return True
    return False


# -------------------------------------------------------------------------- the joint

@dataclass
class Joint:
    """The joint graph, split into forward and backward nodes."""
    gm: fx.GraphModule
    forward: list  # forward call_function nodes, graph order
    backward: set
    needed: set  # forward nodes some backward node reads directly
    order: dict


def classify(gm: fx.GraphModule, num_fwd_outputs: int) -> Joint:
    """Forward nodes: those the forward outputs depend on. Everything else -- tangent-dependent
    nodes and the tangent-free ones only backward uses (a weight's transpose for the input
    gradient) -- runs in backward."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outs = output.args[0][:num_fwd_outputs]
    fwd: set = set()
    stack: list = []
    fx.node.map_arg(outs, stack.append)
    while stack:
        n = stack.pop()
        if n in fwd or n.op != "call_function":
            continue
        fwd.add(n)
        stack.extend(n.all_input_nodes)
    for n in list(fwd):  # an output of a forward multi-output op is a forward value
        if isinstance(n.meta.get("val"), (tuple, list)):
            fwd.update(u for u in n.users if u.target is operator.getitem)
    forward = [n for n in gm.graph.nodes if n in fwd]
    bwd = {n for n in gm.graph.nodes if n.op == "call_function" and n not in fwd}
    needed = {a for n in bwd for a in n.all_input_nodes if a in fwd}
    return Joint(gm, forward, bwd, needed, order)


def relevant(joint: Joint) -> list:
    """Forward nodes backward may need: those it reads and their forward ancestors."""
    keep: set = set()
    stack = list(joint.needed)
    while stack:
        n = stack.pop()
        if n in keep:
            continue
        keep.add(n)
        stack.extend(a for a in n.all_input_nodes if a.op == "call_function")
    return sorted(keep, key=joint.order.get)


# ------------------------------------------------------------------------ the network

@dataclass
class Network:
    graph: nx.DiGraph
    nodes: list  # the forward nodes solved here, graph order
    external: list  # inputs from outside this group: may be saved, not recomputed


def _cap(x: float) -> int:
    return int(round(x * INF_SCALE))


def build_network(nodes: list, joint: Joint, policy: Policy, lam: float,
                  costs: "CostCache") -> Network:
    """The flow network over ``nodes`` (one group of forward nodes); see the module docstring."""
    inside = set(nodes)
    external = sorted({a for n in nodes for a in n.all_input_nodes
                       if a.op == "call_function" and a not in inside}, key=joint.order.get)
    g = nx.DiGraph()
    for v in [*external, *nodes]:
        vin, vout = ("in", v.name), ("out", v.name)
        ext = v not in inside
        if ext or not recomputable(v, policy):
            g.add_edge("source", vin)  # no capacity attribute: infinite
        else:
            g.add_edge("source", vin, capacity=_cap(costs.time(v)))
        # an external input may be kept whatever the policy: its own group decides the rest
        multi = isinstance(v.meta.get("val"), (tuple, list))
        if multi or not (ext or saveable(v, policy)):
            g.add_edge(vin, vout)
        else:
            # λ = ∞ (memory first): bytes dominate any sum of recompute times, which still
            # break ties between plans of equal bytes
            cap = _cap(lam * costs.nbytes(v)) if math.isfinite(lam) else costs.nbytes(v) * MEMORY_FIRST
            g.add_edge(vin, vout, capacity=cap)
        if v in joint.needed:
            g.add_edge(vout, "sink")
        for u in v.users:
            if u in inside:
                g.add_edge(vout, ("in", u.name))
    return Network(g, nodes, external)


class CostCache:
    def __init__(self, hw: Hardware):
        self.hw = hw
        self._t: dict = {}
        self._b: dict = {}
        self._f: dict = {}

    def time(self, n):
        if n not in self._t:
            self._t[n] = node_time(n, self.hw)
        return self._t[n]

    def nbytes(self, n):
        """Bytes saving ``n`` keeps alive: its storage's (a view keeps its base alive)."""
        if n not in self._b:
            root = storage_root(n)
            self._b[n] = 0 if root.op == "placeholder" else value_bytes(root)
        return self._b[n]

    def flops(self, n):
        if n not in self._f:
            self._f[n] = node_cost(n).flops
        return self._f[n]


@dataclass
class Cut:
    saved: list  # forward nodes kept for backward, graph order
    recomputed: list  # forward nodes run again in backward
    saved_bytes: int
    recompute_time: float
    recompute_flops: int
    lam: float


def solve_at(nodes: list, joint: Joint, policy: Policy, lam: float, costs: CostCache) -> Cut:
    """The minimum cut at ``λ`` for one group of forward nodes."""
    net = build_network(nodes, joint, policy, lam, costs)
    if "sink" not in net.graph:
        return Cut([], [], 0, 0.0, 0, lam)
    _, (src_side, _) = nx.minimum_cut(net.graph, "source", "sink")
    by_name = {n.name: n for n in [*net.external, *nodes]}
    recomputed = [n for n in nodes if ("in", n.name) not in src_side]
    saved = [by_name[v[1]] for v in net.graph.nodes
             if isinstance(v, tuple) and v[0] == "in" and v in src_side
             and ("out", v[1]) not in src_side]
    saved.sort(key=joint.order.get)
    return Cut(saved, recomputed, saved_bytes(saved),
               sum(costs.time(n) for n in recomputed), sum(costs.flops(n) for n in recomputed),
               lam)


# ------------------------------------------------------------------------ layer classes

_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_of(path: str) -> Optional[str]:
    m = _LAYER.match(path or "")
    return m.group(1) if m else None


@dataclass
class LayerClass:
    members: list  # each a list of forward nodes of one layer, aligned by position


def group_layers(nodes: list, layer_key: Callable) -> tuple[list, list]:
    """Split ``nodes`` into layer classes (structurally identical layers) and the rest."""
    layers: dict = {}
    rest = []
    for n in nodes:
        key = layer_key(n)
        (layers.setdefault(key, []) if key is not None else rest).append(n)
    classes: dict = {}
    for key, members in layers.items():
        classes.setdefault(_signature(members), []).append(members)
    return [LayerClass(m) for m in classes.values()], rest


def _signature(members: list) -> tuple:
    index = {n: i for i, n in enumerate(members)}
    sig = []
    for n in members:
        v = n.meta.get("val")
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else None
        ins = tuple(index.get(a, -1) for a in n.all_input_nodes)
        sig.append((str(n.target), shape, ins, len(n.users)))
    return tuple(sig)


@dataclass
class Plan:
    saved: list
    recomputed: list
    saved_bytes: int
    recompute_time: float
    recompute_flops: int
    lam: float
    solves: int = 0


@dataclass
class Unit:
    """One layer's (or the non-layer remainder's) decision at one λ."""
    saved: list
    recomputed: list


def solve_units(classes: list, rest: list, joint: Joint, policy: Policy, lam: float,
                costs: CostCache) -> tuple[list, int]:
    """Solve one representative per layer class (and the remainder) at ``λ``; map each
    representative's cut onto every layer of its class. Returns (units, number of solves)."""
    units: list = []
    solves = 0
    for cls in classes:
        rep = cls.members[0]
        cut = solve_at(rep, joint, policy, lam, costs)
        solves += 1
        pos = {n: i for i, n in enumerate(rep)}
        ext = _externals(rep)
        for members in cls.members:
            units.append(Unit(
                [members[pos[n]] if n in pos else _map_external(n, ext, members)
                 for n in cut.saved],
                [members[pos[n]] for n in cut.recomputed]))
    if rest:
        cut = solve_at(rest, joint, policy, lam, costs)
        solves += 1
        units.append(Unit(cut.saved, cut.recomputed))
    return units, solves


def combine(units: list, joint: Joint, costs: CostCache, lam: float, solves: int = 0) -> Plan:
    """The plan made of the units' decisions (a value saved by any unit is saved)."""
    saved = sorted({n: None for u in units for n in u.saved if n is not None},
                   key=joint.order.get)
    kept = set(saved)  # a value one unit saves is not recomputed by another
    rec = sorted({n for u in units for n in u.recomputed if n not in kept}, key=joint.order.get)
    return Plan(saved, rec, saved_bytes(saved),
                sum(costs.time(n) for n in rec), sum(costs.flops(n) for n in rec), lam, solves)


def solve_grouped(classes: list, rest: list, joint: Joint, policy: Policy, lam: float,
                  costs: CostCache) -> Plan:
    units, solves = solve_units(classes, rest, joint, policy, lam, costs)
    return combine(units, joint, costs, lam, solves)


def _externals(members: list) -> list:
    inside = set(members)
    out: dict = {}
    for n in members:
        for i, a in enumerate(n.all_input_nodes):
            if a.op == "call_function" and a not in inside:
                out.setdefault(a, (members.index(n), i))
    return list(out.items())


def _map_external(node, ext: list, members: list):
    for a, (pos, i) in ext:
        if a is node:
            return members[pos].all_input_nodes[i]
    return None


# -------------------------------------------------------------------------- the search

@dataclass
class Totals:
    step_time: float
    step_flops: int


def step_totals(joint: Joint, costs: CostCache) -> Totals:
    t = f = 0
    for n in joint.gm.graph.nodes:
        if n.op == "call_function":
            t += costs.time(n)
            f += costs.flops(n)
    return Totals(t, f)


LOG_LAMBDA = (-16.0, 2.0)  # λ in s/byte: from "bytes are free" to "time is free"
BISECTIONS = 16


def search(joint: Joint, policy: Policy, hw: Hardware, layer_key: Callable) -> Plan:
    """The plan the policy asks for (see the module docstring)."""
    from .refine import LOCAL_SEARCH_NODES, Evaluator, allocate, mix, polish
    costs = CostCache(hw)
    nodes = relevant(joint)
    classes, rest = group_layers(nodes, layer_key)
    if len(nodes) <= LOCAL_SEARCH_NODES and not policy.memory_first:
        # small enough to cut whole: no layer boundary limits what may be recomputed
        classes, rest = [], nodes
    solves = 0

    history: list = []  # the units of every cut made, for the per-layer allocation

    def at(lam):
        nonlocal solves
        units, k = solve_units(classes, rest, joint, policy, lam, costs)
        solves += k
        history.append(units)
        return units, combine(units, joint, costs, lam)

    if policy.memory_first:
        best = at(math.inf)[1]
        best.solves = solves
        return best
    totals = step_totals(joint, costs)
    budget_mode = policy.budget is not None
    if budget_mode:
        ok = lambda p: p.saved_bytes <= policy.budget  # noqa: E731
        rank = lambda p: (p.recompute_time, p.saved_bytes)  # noqa: E731
    else:
        ok = lambda p: (p.recompute_time <= policy.max_overhead * totals.step_time  # noqa: E731
                        and p.recompute_flops <= policy.max_overhead * max(totals.step_flops, 1))
        rank = lambda p: (p.saved_bytes, p.recompute_time)  # noqa: E731
    # below: the λ side with less recompute; above: more recompute, less memory
    below = at(0.0)
    above = at(math.inf)
    if budget_mode and not ok(above[1]):
        raise InfeasibleBudget(policy.budget, above[1].saved_bytes)
    feasible = [p for _, p in (below, above) if ok(p)]
    lo, hi = LOG_LAMBDA
    for _ in range(BISECTIONS):  # bisect log λ for the boundary of feasibility
        mid = (lo + hi) / 2
        units, p = at(10.0 ** mid)
        if ok(p):
            feasible.append(p)
        if ok(p) != budget_mode:
            lo, below = mid, (units, p)
        else:
            hi, above = mid, (units, p)
    feasible.append(mix(below[0], above[0], ok, rank, joint, costs))
    feasible.append(allocate(history, ok, budget_mode, joint, costs, policy, totals))
    best = min((p for p in feasible if p is not None and ok(p)), key=rank,
               default=below[1])
    if len(nodes) <= LOCAL_SEARCH_NODES and ok(best):
        # polish from every feasible cut of the sweep, by two greedy rules; keep the best
        ev = Evaluator(joint, nodes, policy, costs)
        starts = sorted((p for p in feasible if p is not None and ok(p)), key=rank)[:6]
        for start in starts:
            for by_ratio in (True, False):
                improved = polish(start, ev, ok, by_ratio, budget_mode)
                if improved is not None and ok(improved) and rank(improved) < rank(best):
                    best = improved
    best.solves = solves
    return best
