"""The exact recompute plan of a small joint graph: a Checkmate-style 0/1 program (reference only).

Over exactly the forward nodes :func:`autoseqpar.solver.relevant` returns (no layer grouping),
two binary variables per node ``v``: ``r_v`` (recomputed in backward) and ``s_v`` (saved)::

    minimise    Σ time(v) · r_v
    subject to  Σ bytes(v) · s_v <= budget
                s_v + r_v >= r_u      for every forward edge v -> u inside the set
                s_v + r_v >= 1        for every v that a backward node reads (joint.needed)
                r_v = 0               where not solver.recomputable(v, policy)
                s_v = 0               where not solver.saveable(v, policy)
                                      (the rules solver.build_network uses)

Inputs of the set outside it (placeholders: primals, tangents) are available for free. Costs
are the solver's (:class:`autoseqpar.solver.CostCache`), so the optimum is the yardstick for
:func:`autoseqpar.solver.search`. Solved by ``scipy.optimize.milp`` (HiGHS) to a relative gap of
1e-9; times are scaled to the largest one for the solve and re-summed exactly afterwards.

The returned plan is minimal for its recompute set: a node is kept recomputed only where backward
or another recomputed node reads it, and saved only where backward or a recomputed user reads it
and it is not recomputed. When no plan fits the budget, :class:`InfeasibleBudget` carries the
least bytes any plan saves (a second program: minimise Σ bytes(v) · s_v).

scipy is an optional dependency (``pip install autoseqpar[ilp]``); it is imported on call.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from .cost_model import Hardware
from .solver import (CostCache, InfeasibleBudget, Joint, Plan, Policy, recomputable, relevant,
                     saveable)


def _scipy():
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import lil_matrix
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("autoseqpar.ilp needs scipy >= 1.9 (scipy.optimize.milp): "
                          "pip install 'autoseqpar[ilp]' or pip install scipy") from e
    return Bounds, LinearConstraint, milp, lil_matrix


def solve_exact(joint: Joint, policy: Policy, hw: Hardware, budget_bytes: Optional[int],
                layer_key: Optional[Callable] = None) -> Plan:
    """The least-recompute plan saving at most ``budget_bytes`` (None: no limit). ``layer_key``
    is accepted for symmetry with :func:`autoseqpar.solver.search` and ignored."""
    Bounds, LinearConstraint, milp, lil_matrix = _scipy()
    costs = CostCache(hw)
    nodes = relevant(joint)
    k = len(nodes)
    if k == 0:
        return Plan([], [], 0, 0.0, 0, math.nan, 0)
    idx = {n: i for i, n in enumerate(nodes)}  # r_v is variable i, s_v is variable k + i
    time = np.array([costs.time(n) for n in nodes], dtype=float)
    nbytes = np.array([costs.nbytes(n) for n in nodes], dtype=float)
    can_r = [recomputable(n, policy) for n in nodes]
    can_s = [saveable(n, policy) for n in nodes]
    edges = [(idx[v], idx[u]) for v in nodes for u in v.users if u in idx]
    needed = [idx[v] for v in nodes if v in joint.needed]
    rows = lil_matrix((len(edges) + len(needed), 2 * k))
    for j, (a, b) in enumerate(edges):  # s_a + r_a - r_b >= 0
        rows[j, a] += 1
        rows[j, k + a] += 1
        rows[j, b] -= 1
    for j, a in enumerate(needed, len(edges)):  # s_a + r_a >= 1
        rows[j, a] = rows[j, k + a] = 1
    lower = np.r_[np.zeros(len(edges)), np.ones(len(needed))]
    closure = LinearConstraint(rows.tocsr(), lower, np.inf)
    ub = np.array([float(x) for x in [*can_r, *can_s]])
    bounds = Bounds(np.zeros(2 * k), ub)
    integrality = np.ones(2 * k)
    memory = np.r_[np.zeros(k), nbytes]
    opts = {"mip_rel_gap": 1e-9, "disp": False}

    scale = time.max() if time.max() > 0 else 1.0
    cons = [closure]
    if budget_bytes is not None:
        cons.append(LinearConstraint(memory[None, :], -np.inf, float(budget_bytes) + 0.5))
    res = milp(np.r_[time / scale, np.zeros(k)], constraints=cons, bounds=bounds,
               integrality=integrality, options=opts)
    if res.x is None:
        least = milp(memory, constraints=[closure], bounds=bounds, integrality=integrality,
                     options=opts)
        if least.x is None:  # a needed node neither savable nor recomputable
            raise InfeasibleBudget(budget_bytes if budget_bytes is not None else -1, -1)
        raise InfeasibleBudget(budget_bytes, int(round(least.fun)))

    rec = [bool(round(x)) for x in res.x[:k]]
    for i in reversed(range(k)):  # users come later in graph order
        rec[i] = rec[i] and (nodes[i] in joint.needed
                             or any(rec[idx[u]] for u in nodes[i].users if u in idx))
    saved = [n for i, n in enumerate(nodes) if not rec[i] and (
        n in joint.needed or any(rec[idx[u]] for u in n.users if u in idx))]
    recomputed = [n for i, n in enumerate(nodes) if rec[i]]
    return Plan(saved, recomputed, sum(costs.nbytes(n) for n in saved),
                sum(costs.time(n) for n in recomputed),
                sum(costs.flops(n) for n in recomputed), math.nan, 1)
