"""Refinements after the cuts: what a λ sweep alone cannot reach.

* :func:`mix` and :func:`allocate` combine, layer by layer, decisions the sweep's cuts made (a
  cut's units are independent layers, so a plan may take one layer from one λ and the next from
  another): the points between two cuts' memory and time.
* :class:`Evaluator` and :func:`polish` work under the exact constraint on small graphs: a plan
  is its saved set, the backward recomputes the rest, and one save is added (budget) or dropped
  (overhead allowance) at a time.

Every result is checked whole with the constraint before :func:`autoseqpar.solver.search` may
pick it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from .cost_model import saved_bytes
from .solver import (CostCache, Joint, Plan, Policy, Totals, combine, recomputable,
                     saveable)

LOCAL_SEARCH_NODES = 400  # graphs of up to ~3 layers: cut whole, then the greedy polish


class Evaluator:
    """A plan from its saved set alone: backward recomputes every value it needs that is not
    saved (and their inputs, transitively); None when that would rerun a banned node."""

    def __init__(self, joint: Joint, nodes: list, policy: Policy, costs: CostCache):
        self.joint, self.costs = joint, costs
        self.inside = set(nodes)
        self.allowed = {v: recomputable(v, policy) for v in nodes}
        self.saveable = {v: saveable(v, policy) for v in nodes}
        self.needed = [v for v in nodes if v in joint.needed]

    def __call__(self, saved: set) -> Optional[Plan]:
        rec: set = set()
        stack = [v for v in self.needed if v not in saved]
        while stack:
            v = stack.pop()
            if v in rec or v in saved:
                continue
            if not self.allowed[v]:
                return None
            rec.add(v)
            stack.extend(a for a in v.all_input_nodes if a in self.inside)
        used = sorted((v for v in saved if v in self.joint.needed or
                       any(u in rec for u in v.users)), key=self.joint.order.get)
        rec_l = sorted(rec, key=self.joint.order.get)
        c = self.costs
        return Plan(used, rec_l, saved_bytes(used), sum(c.time(v) for v in rec_l),
                    sum(c.flops(v) for v in rec_l), math.nan)


def polish(plan: Plan, ev: Evaluator, ok: Callable, by_ratio: bool, budget_mode: bool
            ) -> Optional[Plan]:
    """Greedy, one value at a time, under the exact constraint ``ok``. Budget mode spends the
    unused budget: save the recomputed value that removes the most recompute time (per byte).
    Overhead mode spends the unused allowance: stop saving the value that frees the most bytes
    (per second of recompute added)."""
    cur = ev(set(plan.saved))
    while cur is not None:
        best = None
        for v in (cur.recomputed if budget_mode else cur.saved):
            if budget_mode and not ev.saveable[v]:
                continue
            p = ev(set(cur.saved) | {v}) if budget_mode else ev(set(cur.saved) - {v})
            if p is None or not ok(p):
                continue
            if budget_mode:
                gain, cost = cur.recompute_time - p.recompute_time, p.saved_bytes - cur.saved_bytes
            else:
                gain, cost = cur.saved_bytes - p.saved_bytes, p.recompute_time - cur.recompute_time
            if gain <= 0:
                continue
            score = gain / max(cost, 1e-15) if by_ratio else gain
            if best is None or score > best[0]:
                best = (score, p)
        if best is None:
            return cur
        cur = best[1]
    return None


def allocate(history: list, ok: Callable, budget_mode: bool, joint: Joint, costs: CostCache,
              policy: Policy, totals: Totals) -> Optional[Plan]:
    """Per layer, any of the decisions the sweep's cuts made for it: start every layer at its
    cheapest side (least recompute; least memory under a budget) and move one layer at a time to
    the decision with the best trade (bytes freed per second added; seconds saved per byte
    added) while the sums stay within the constraint. Layers add up (up to a value two layers
    both save), so the sums are per-unit figures and the result is checked whole."""
    if not history or any(len(h) != len(history[0]) for h in history):
        return None

    def stats(u):
        rec = [n for n in u.recomputed if n not in set(u.saved)]
        return (saved_bytes(u.saved), sum(costs.time(n) for n in rec),
                sum(costs.flops(n) for n in rec))

    cands = [[(stats(h[i]), h[i]) for h in history] for i in range(len(history[0]))]
    key = (lambda c: (c[0][0], c[0][1])) if budget_mode else (lambda c: (c[0][1], c[0][0]))
    chosen = [min(c, key=key) for c in cands]
    mem, tim, flo = (sum(c[0][k] for c in chosen) for k in range(3))
    t_max = policy.max_overhead * totals.step_time
    f_max = policy.max_overhead * max(totals.step_flops, 1)
    while True:
        best = None
        for i, options in enumerate(cands):
            (m0, t0, f0), _ = chosen[i]
            for (m, t, f), unit in options:
                dm, dt, df = m - m0, t - t0, f - f0
                if budget_mode:  # spend bytes to save time
                    if dt >= 0 or mem + dm > policy.budget:
                        continue
                    score = -dt / max(dm, 1)
                else:  # spend time to save bytes
                    if dm >= 0 or tim + dt > t_max or flo + df > f_max:
                        continue
                    score = -dm / max(dt, 1e-15)
                if best is None or score > best[0]:
                    best = (score, i, ((m, t, f), unit))
        if best is None:
            break
        _, i, pick = best
        (m0, t0, f0), _ = chosen[i]
        (m, t, f), _ = pick
        mem, tim, flo = mem + m - m0, tim + t - t0, flo + f - f0
        chosen[i] = pick
    plan = combine([u for _, u in chosen], joint, costs, math.nan)
    return plan if ok(plan) else None


def mix(below: list, above: list, ok: Callable, rank: Callable, joint: Joint,
         costs: CostCache) -> Optional[Plan]:
    """Layer by layer between the two plans either side of the feasibility boundary: take the
    more-recompute decision for as many layers as the constraint allows (the remainder last).
    Mixed plans reach the points between two λ (a budget between two cuts' memory)."""
    if len(below) != len(above):
        return None
    units = list(below)
    best = None
    for i in range(len(units)):
        trial = units[:i] + [above[i]] + units[i + 1:]
        plan = combine(trial, joint, costs, math.nan)
        if ok(plan):
            units = trial
            if best is None or rank(plan) < rank(best):
                best = plan
    start = combine(units, joint, costs, math.nan)
    if ok(start) and (best is None or rank(start) < rank(best)):
        best = start
    return best
