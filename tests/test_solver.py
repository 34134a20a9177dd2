"""The recompute solver: known cuts on hand-built joint graphs, the budget property on NanoGPT's
joint graph, and the gap to the exact 0/1 program (autoseqpar.ilp). Single process."""
import math
import operator
from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx

from autoseqpar import solver
from autoseqpar.cost_model import Hardware
from autoseqpar.solver import CostCache, InfeasibleBudget, Policy

aten = torch.ops.aten
NS = 1e-9
# 1 GFLOP/s and unlimited memory bandwidth: an op takes (its FLOPs) nanoseconds -- elementwise
# ops one FLOP per element, mm 2*m*k*n. float32 tensors: 4 bytes per element.
HW = Hardware("unit", flops_16bit=1e9, flops_32bit=1e9, mem_bw=1e18, link_bw=1e9,
              link_latency=0.0)
NO_LAYERS = lambda n: None  # noqa: E731


# --------------------------------------------------------------------- hand-built joints

class _Record(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        if n.op != "output":
            n.meta["val"] = out
        return out


class Builder:
    """A joint-like graph: placeholders primals_i / tangents_i, aten call_function nodes, and
    the output ``(*forward outputs, *gradients)``; meta["val"] from running it on real tensors."""

    def __init__(self):
        self.g = fx.Graph()
        self.examples = []
        self.nodes = {}

    def input(self, name, t):
        self.examples.append(t)
        return self.g.placeholder(name)

    def op(self, name, target, *args):
        n = self.g.create_node("call_function", target, args, {}, name=name)
        self.nodes[name] = n
        return n

    def joint(self, fwd, grads):
        self.g.output((*fwd, *grads))
        gm = fx.GraphModule(torch.nn.Module(), self.g)
        _Record(gm).run(*self.examples)
        return solver.classify(gm, len(fwd))


def chain(head_mm=False):
    """x -> [mm ->] relu (a) -> relu (b) -> mm (y); backward reads a and b (and w)."""
    G = Builder()
    if head_mm:
        x0 = G.input("primals_1", torch.randn(8, 16))
        w0 = G.input("primals_2", torch.randn(16, 64))
        x = G.op("h", aten.mm.default, x0, w0)  # (8, 64): 16384 ns
    else:
        x = G.input("primals_1", torch.randn(8, 64))
    w = G.input("primals_3", torch.randn(64, 16))
    t1 = G.input("tangents_1", torch.randn(8, 16))
    a = G.op("a", aten.relu.default, x)  # 512 ns, 2048 bytes
    b = G.op("b", aten.relu.default, a)  # 512 ns, 2048 bytes
    y = G.op("y", aten.mm.default, b, w)
    gb = G.op("gb", aten.mm.default, t1, G.op("wt", aten.t.default, w))
    ga = G.op("ga", aten.threshold_backward.default, gb, b, 0.0)
    gx = G.op("gx", aten.threshold_backward.default, ga, a, 0.0)
    gw = G.op("gw", aten.mm.default, G.op("bt", aten.t.default, b), t1)
    return G.joint([y], [gx, gw]), G.nodes


def broadcast(first="mm"):
    """s = first(x) (small) -> big = s * c (64x larger, cheap) -> t = tanh(big); backward reads t.

    first="mm": s costs 65536 ns; "bernoulli" / "sigmoid": 512 ns (random / not);
    "dropout": native_dropout, a multi-output random op whose mask backward also reads."""
    G = Builder()
    x = G.input("primals_1", torch.rand(8, 256) if first == "mm" else torch.rand(8, 16))
    c = G.input("primals_2", torch.randn(64, 8, 16))
    t1 = G.input("tangents_1", torch.randn(()))
    mask = None
    if first == "mm":
        w = G.input("primals_3", torch.randn(256, 16))
        s = G.op("s", aten.mm.default, x, w)
    elif first == "bernoulli":
        s = G.op("s", aten.bernoulli.p, x, 0.5)
    elif first == "sigmoid":
        s = G.op("s", aten.sigmoid.default, x)
    else:
        nd = G.op("nd", aten.native_dropout.default, x, 0.5, True)
        s = G.op("s", operator.getitem, nd, 0)
        mask = G.op("mask", operator.getitem, nd, 1)
    big = G.op("big", aten.mul.Tensor, s, c)  # (64, 8, 16): 8192 ns, 32768 bytes
    t = G.op("t", aten.tanh.default, big)  # 8192 ns, 32768 bytes
    y = G.op("y", aten.sum.default, t)
    gt = G.op("gt", aten.expand.default, t1, [64, 8, 16])
    gbig = G.op("gbig", aten.tanh_backward.default, gt, t)
    gs = G.op("gs", aten.sum.dim_IntList, G.op("gc", aten.mul.Tensor, gbig, c), [0])
    grads = [gs]
    if mask is not None:
        grads = [G.op("gx", aten.native_dropout_backward.default, gs, mask, 2.0)]
    return G.joint([y], grads), G.nodes


def names(nodes):
    return [n.name for n in nodes]


def cut(joint, policy, lam):
    return solver.solve_at(solver.relevant(joint), joint, policy, lam, CostCache(HW))


def check_plan(joint, plan, policy):
    """A plan backward can run from: what it reads is saved or recomputed, what is recomputed
    has its inputs saved, recomputed or primal; nothing banned is recomputed, nothing
    multi-output is saved; the totals are the sums."""
    saved, rec = set(plan.saved), set(plan.recomputed)
    costs = CostCache(getattr(joint, "hw", HW))  # NanoGPT joints carry their profile
    for v in joint.needed:
        assert v in saved or v in rec, f"{v.name} is read by backward but neither saved nor " \
                                       "recomputed"
    for v in rec:
        assert not solver.banned_from_recompute(v), v.name
        assert policy.allow(v) or policy.constant(v), v.name
        for a in v.all_input_nodes:
            assert a.op == "placeholder" or a in saved or a in rec, (v.name, a.name)
    for v in saved:
        assert not isinstance(v.meta["val"], (tuple, list)), v.name
    assert plan.saved_bytes == sum(costs.nbytes(n) for n in plan.saved)
    assert plan.recompute_time == pytest.approx(sum(costs.time(n) for n in plan.recomputed))
    assert names(plan.saved) == names(sorted(plan.saved, key=joint.order.get))
    assert names(plan.recomputed) == names(sorted(plan.recomputed, key=joint.order.get))


# ------------------------------------------------------------------------ (a) known cuts

def test_chain_lambda_zero_saves_what_backward_reads():
    joint, _ = chain()
    assert names(solver.relevant(joint)) == ["a", "b"]
    assert {n.name for n in joint.needed} == {"a", "b"}
    c = cut(joint, Policy("t"), 0.0)
    assert names(c.saved) == ["a", "b"] and c.recomputed == []
    assert c.saved_bytes == 2 * 2048 and c.recompute_time == 0


@pytest.mark.parametrize("lam", [1e-9, 1.0, math.inf])
def test_chain_large_lambda_recomputes_the_relus_from_the_primal(lam):
    joint, _ = chain()
    c = cut(joint, Policy("t"), lam)
    assert c.saved == [] and names(c.recomputed) == ["a", "b"]
    assert c.recompute_time == pytest.approx(1024 * NS)


def test_chain_cheapest_cut_above_an_unrecomputable_matmul():
    joint, _ = chain(head_mm=True)
    no_mm = Policy("t", allow=lambda n: n.target is not aten.mm.default)
    # save {a, b}: 4096 λ; save a, recompute b: 2048 λ + 512 ns; save h: 2048 λ + 1024 ns
    c = cut(joint, no_mm, 1e-10)
    assert names(c.saved) == ["a", "b"] and c.recomputed == []
    for lam in (1e-9, 1.0, math.inf):
        c = cut(joint, no_mm, lam)
        assert names(c.saved) == ["a"] and names(c.recomputed) == ["b"], lam
        assert c.saved_bytes == 2048 and c.recompute_time == pytest.approx(512 * NS)
    # allowed, the 16384 ns matmul is recomputed only when bytes are expensive enough
    assert names(cut(joint, Policy("t"), 1e-9).saved) == ["a"]
    c = cut(joint, Policy("t"), 1e-3)
    assert c.saved == [] and names(c.recomputed) == ["h", "a", "b"]


def test_save_the_small_input_and_recompute_the_big_cheap_values():
    joint, _ = broadcast("mm")
    assert names(solver.relevant(joint)) == ["s", "big", "t"]
    # save t: 32768 λ;  save big: 32768 λ + 8192 ns;  save s: 512 λ + 16384 ns;  none: 81920 ns
    c = cut(joint, Policy("t"), 1e-9)
    assert names(c.saved) == ["s"] and names(c.recomputed) == ["big", "t"]
    assert c.saved_bytes == 512 and c.recompute_time == pytest.approx(16384 * NS)
    c = cut(joint, Policy("t"), 1e-11)
    assert names(c.saved) == ["t"] and c.recomputed == []
    c = cut(joint, Policy("t"), 1.0)
    assert c.saved == [] and names(c.recomputed) == ["s", "big", "t"]


@pytest.mark.parametrize("lam", [1e-9, 1.0, math.inf])
def test_random_ops_are_never_recomputed(lam):
    joint, nodes = broadcast("sigmoid")  # the same graph with a deterministic op: recomputed
    assert "s" in names(cut(joint, Policy("t"), lam).recomputed)
    joint, nodes = broadcast("bernoulli")
    c = cut(joint, Policy("t"), lam)
    assert names(c.saved) == ["s"] and names(c.recomputed) == ["big", "t"]
    joint, nodes = broadcast("dropout")
    assert solver.banned_from_recompute(nodes["nd"])
    c = cut(joint, Policy("t"), lam)
    # native_dropout is neither recomputed nor saved (multi-output): its outputs are saved
    assert names(c.saved) == ["s", "mask"] and names(c.recomputed) == ["big", "t"]
    assert c.saved_bytes == 512 + 128


def test_policy_allow_and_must_recompute():
    joint, _ = broadcast("mm")
    keep_t = Policy("t", allow=lambda n: n.name != "t")
    c = cut(joint, keep_t, 1.0)
    assert names(c.saved) == ["t"] and c.recomputed == []
    no_save_s = Policy("t", must_recompute=lambda n: n.name == "s")
    assert names(cut(joint, no_save_s, 1e-9).saved) == ["t"]  # 32768 ns < 81920 ns
    c = cut(joint, no_save_s, 1e-8)  # 327680 ns: recompute everything instead
    assert c.saved == [] and names(c.recomputed) == ["s", "big", "t"]


def test_search_budget_and_exact_agree_on_a_convex_tradeoff():
    pytest.importorskip("scipy")
    from autoseqpar.ilp import solve_exact
    joint, _ = broadcast("mm")
    pol = Policy("budget")
    for budget, saved, time in [(10**6, ["t"], 0), (32768, ["t"], 0), (32767, ["s"], 16384),
                                (512, ["s"], 16384), (511, [], 81920), (0, [], 81920)]:
        exact = solve_exact(joint, pol, HW, budget)
        check_plan(joint, exact, pol)
        assert names(exact.saved) == saved, budget
        assert exact.recompute_time == pytest.approx(time * NS), budget
        found = solver.search(joint, replace(pol, budget=budget), HW, NO_LAYERS)
        check_plan(joint, found, pol)
        assert names(found.saved) == saved, budget
        assert found.recompute_time == pytest.approx(time * NS), budget


def brute_force(joint, policy, budget):
    """The least recompute time over every recompute set (tiny graphs), or None."""
    import itertools
    costs = CostCache(HW)
    nodes = solver.relevant(joint)
    best = None
    for bits in itertools.product((False, True), repeat=len(nodes)):
        rec = {n for n, b in zip(nodes, bits) if b}
        saved = {v for v in nodes if v not in rec and (v in joint.needed or rec & set(v.users))}
        if any(solver.banned_from_recompute(v) or not policy.allow(v) for v in rec):
            continue
        if any(policy.must_recompute(v) or isinstance(v.meta["val"], tuple) for v in saved):
            continue
        if sum(costs.nbytes(v) for v in saved) > budget:
            continue
        t = sum(costs.time(v) for v in rec)
        best = t if best is None else min(best, t)
    return best


def test_exact_matches_brute_force_on_hand_graphs():
    pytest.importorskip("scipy")
    from autoseqpar.ilp import solve_exact
    graphs = [(chain()[0], Policy("t")), (chain(True)[0], Policy("t")),
              (chain(True)[0], Policy("t", allow=lambda n: n.target is not aten.mm.default)),
              (broadcast("mm")[0], Policy("t", must_recompute=lambda n: n.name == "big")),
              (broadcast("dropout")[0], Policy("t")), (fan_out(), Policy("t"))]
    for joint, pol in graphs:
        for budget in (0, 100, 200, 512, 640, 1000, 2048, 4096, 32768, 10**6):
            want = brute_force(joint, pol, budget)
            if want is None:
                with pytest.raises(InfeasibleBudget):
                    solve_exact(joint, pol, HW, budget)
                continue
            got = solve_exact(joint, pol, HW, budget)
            check_plan(joint, got, pol)
            assert got.saved_bytes <= budget
            assert got.recompute_time == pytest.approx(want, abs=1e-15), (names(got.saved), budget)


def test_exact_infeasible_budget_reports_the_minimum():
    pytest.importorskip("scipy")
    from autoseqpar.ilp import solve_exact
    joint, _ = broadcast("bernoulli")
    exact = solve_exact(joint, Policy("budget"), HW, 512)
    assert names(exact.saved) == ["s"] and names(exact.recomputed) == ["big", "t"]
    with pytest.raises(InfeasibleBudget) as e:
        solve_exact(joint, Policy("budget"), HW, 511)
    assert e.value.minimum == 512
    with pytest.raises(InfeasibleBudget) as e:
        solver.search(joint, Policy("budget", budget=511), HW, NO_LAYERS)
    assert e.value.minimum == 512


def fan_out():
    """big = bernoulli(x) (1000 bytes, may not be recomputed) -> a = sum, b = amax (100 bytes
    each) -> relu; backward reads both relus. Least bytes: save two 100-byte tensors."""
    G = Builder()
    x = G.input("primals_1", torch.rand(25, 10))
    t1 = G.input("tangents_1", torch.randn(25))
    big = G.op("big", aten.bernoulli.p, x, 0.5)
    ra = G.op("ra", aten.relu.default, G.op("a", aten.sum.dim_IntList, big, [1]))
    rb = G.op("rb", aten.relu.default, G.op("b", aten.amax.default, big, [1]))
    y = G.op("y", aten.add.Tensor, ra, rb)
    ga = G.op("ga", aten.threshold_backward.default, t1, ra, 0.0)
    gb = G.op("gb", aten.threshold_backward.default, t1, rb, 0.0)
    return G.joint([y], [ga, gb])


def test_fan_out_finite_lambda_saves_least_bytes():
    joint = fan_out()
    c = cut(joint, Policy("t"), 1.0)
    assert c.saved_bytes == 200 and names(c.saved) == ["ra", "rb"]


def test_lambda_infinity_saves_least_bytes():
    joint = fan_out()
    c = cut(joint, Policy("t"), math.inf)
    assert c.saved_bytes == 200
    plan = solver.search(joint, Policy("budget", budget=500), HW, NO_LAYERS)
    assert plan.saved_bytes <= 500


def test_memory_first_is_lambda_infinity_on_hand_graphs():
    for joint, pol in [(chain()[0], Policy("t")), (chain(True)[0], Policy("t")),
                       (broadcast("mm")[0], Policy("t", allow=lambda n: n.name != "s")),
                       (broadcast("dropout")[0], Policy("t"))]:
        plan = solver.search(joint, replace(pol, memory_first=True), HW, NO_LAYERS)
        c = cut(joint, pol, math.inf)
        assert names(plan.saved) == names(c.saved)
        assert names(plan.recomputed) == names(c.recomputed)
        check_plan(joint, plan, pol)


# ------------------------------------------------------------------ NanoGPT joint graphs

@dataclass
class GPTJoint:
    joint: solver.Joint
    facts: object
    layer_key: object
    hw: Hardware
    constant: object

    def policy(self, recompute="none", budget=None):
        from autoseqpar.partition import make_policy
        return replace(make_policy(recompute, budget, self.facts), constant=self.constant)

    def lambda_plan(self, lam):
        classes, rest = solver.group_layers(solver.relevant(self.joint), self.layer_key)
        return solver.solve_grouped(classes, rest, self.joint, self.policy(budget=10**12), lam,
                                    CostCache(self.hw))

    def bounds(self):
        """(the solver's minimum reachable bytes, the bytes of its λ=0 plan)."""
        try:
            solver.search(self.joint, self.policy(budget=1), self.hw, self.layer_key)
        except InfeasibleBudget as e:
            return e.minimum, self.lambda_plan(0.0).saved_bytes
        return 0, self.lambda_plan(0.0).saved_bytes


@pytest.fixture(scope="module")
def gpt():
    """NanoGPT joint graphs (1 and 2 layers) traced under a fake process group of 2 (the
    conftest fake_group fixture, module-scoped here so each model is traced once)."""
    from passes._compat import fake_process_group_store, source_node_name

    import autoseqpar
    from autoseqpar.partition import graph_facts
    from models import NanoGPT

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=2, store=fake_process_group_store())
    cache = {}

    def get(n_layer):
        if n_layer not in cache:
            torch.manual_seed(0)
            m = NanoGPT(n_layer=n_layer, n_embd=64, n_head=4, block_size=32,
                        dropout=0.1).to(torch.bfloat16)
            ids = torch.randint(0, 64, (2, 32))
            pm = autoseqpar.transform(m, ((ids, ids), {}), recompute="none")
            rec = pm.partitions[-1]
            facts = graph_facts(pm._gm)
            joint = solver.classify(rec.joint, rec.num_fwd_outputs)
            joint.hw = pm.hardware
            cache[n_layer] = GPTJoint(
                joint, facts, lambda n: facts.layer_of.get(source_node_name(n)), pm.hardware,
                solver.activation_free(rec.joint, facts.constant_primals))
        return cache[n_layer]

    yield get
    if dist.is_initialized():
        dist.destroy_process_group()


def budgets(lo, hi, k):
    return sorted({lo + (hi - lo) * i // (k - 1) for i in range(k)})


@pytest.mark.parametrize("n_layer,k", [(1, 10), (2, 6)])
def test_budget_is_never_exceeded(gpt, n_layer, k):
    g = gpt(n_layer)
    lo, hi = g.bounds()
    # every op may be recomputed under a budget (dropout masks replay from their seed), so
    # the whole forward can be rebuilt from the parameters: the minimum may be 0 bytes
    assert 0 <= lo < hi
    for b in budgets(max(lo, 1), hi, k):
        pol = g.policy(budget=b)
        plan = solver.search(g.joint, pol, g.hw, g.layer_key)
        assert plan.saved_bytes <= b, (b, plan.saved_bytes)
        check_plan(g.joint, plan, pol)
    if lo > 1:
        with pytest.raises(InfeasibleBudget) as e:
            solver.search(g.joint, g.policy(budget=lo - 1), g.hw, g.layer_key)
        assert e.value.minimum == lo


def test_exact_plans_are_valid_and_bound_the_solver(gpt):
    pytest.importorskip("scipy")
    from autoseqpar.ilp import solve_exact
    g = gpt(1)
    pol = g.policy(budget=10**12)
    free = solve_exact(g.joint, pol, g.hw, None)
    check_plan(g.joint, free, pol)
    assert free.recompute_time == 0
    assert free.saved_bytes <= g.lambda_plan(0.0).saved_bytes
    # with every op allowed, recomputing from the primals saves nothing
    zero = solve_exact(g.joint, pol, g.hw, 0)
    check_plan(g.joint, zero, pol)
    assert zero.saved == []
    # the "none" policy: only views and collectives may be recomputed
    none = g.policy("none")
    least = solver.search(g.joint, none, g.hw, g.layer_key)
    with pytest.raises(InfeasibleBudget) as e:
        solve_exact(g.joint, none, g.hw, 0)
    assert 0 < e.value.minimum <= least.saved_bytes
    exact = solve_exact(g.joint, none, g.hw, least.saved_bytes)
    check_plan(g.joint, exact, none)
    assert exact.recompute_time <= least.recompute_time + 1e-12


# The sweep runs from 1 byte (every op may be recomputed under a budget) to the least bytes the
# solver keeps with no recompute; the solver is within 5% of the exact optimum at every point.
@pytest.mark.parametrize("n_layer", [1, 2])
def test_solver_within_5_percent_of_exact(gpt, n_layer):
    pytest.importorskip("scipy")
    from autoseqpar.ilp import solve_exact
    g = gpt(n_layer)
    lo, hi = g.bounds()
    # the top of the sweep: the least bytes the solver keeps with no recompute at all (more
    # budget than that is recompute-free for both)
    top = solver.search(g.joint, g.policy(budget=hi), g.hw, g.layer_key)
    assert top.recompute_time == 0
    rows, bad = [], []
    for b in budgets(max(lo, 1), top.saved_bytes, 8):
        pol = g.policy(budget=b)
        exact = solve_exact(g.joint, pol, g.hw, b)
        found = solver.search(g.joint, pol, g.hw, g.layer_key)
        assert exact.saved_bytes <= b and found.saved_bytes <= b
        assert exact.recompute_time <= found.recompute_time + 1e-12, "the ILP is not optimal"
        s, e = found.recompute_time, exact.recompute_time
        rows.append(f"B={b}: solver {s:.4e} s, exact {e:.4e} s")
        if not (s <= 1.05 * e or abs(s - e) <= 1e-7):
            bad.append(rows[-1] + f" (+{(s / e - 1) * 100 if e else math.inf:.0f}%)")
    assert not bad, "solver more than 5% above the exact optimum:\n" + "\n".join(bad)


# ------------------------------------------------------------- (d) memory-first and auto

@pytest.mark.parametrize("n_layer", [1, 2])
def test_memory_first_policies_are_lambda_infinity(gpt, n_layer):
    g = gpt(n_layer)
    costs = CostCache(g.hw)
    classes, rest = solver.group_layers(solver.relevant(g.joint), g.layer_key)
    sizes = []
    for name in ("none", "paper", "full"):
        pol = g.policy(name)
        assert pol.memory_first
        plan = solver.search(g.joint, pol, g.hw, g.layer_key)
        ref = solver.solve_grouped(classes, rest, g.joint, pol, math.inf, costs)
        assert names(plan.saved) == names(ref.saved), name
        assert names(plan.recomputed) == names(ref.recomputed), name
        assert plan.saved_bytes == ref.saved_bytes
        assert plan.recompute_time == ref.recompute_time
        sizes.append(plan.saved_bytes)
    assert sizes[0] >= sizes[1] >= sizes[2]  # more recompute allowed, less memory


@pytest.mark.parametrize("n_layer", [1, 2])
def test_auto_stays_within_its_overhead(gpt, n_layer):
    g = gpt(n_layer)
    pol = g.policy("auto")
    plan = solver.search(g.joint, pol, g.hw, g.layer_key)
    totals = solver.step_totals(g.joint, CostCache(g.hw))
    assert plan.recompute_time <= 0.03 * totals.step_time
    assert plan.recompute_flops <= 0.03 * totals.step_flops
    check_plan(g.joint, plan, pol)
    assert plan.saved_bytes < g.lambda_plan(0.0).saved_bytes  # it does trade some memory


def test_grouped_plans_never_save_and_recompute_a_value(gpt):
    g = gpt(1)
    for name in ("none", "full", "auto"):
        plan = solver.search(g.joint, g.policy(name), g.hw, g.layer_key)
        both = set(plan.saved) & set(plan.recomputed)
        assert not both, (name, names(sorted(both, key=g.joint.order.get)))
