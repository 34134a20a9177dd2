"""What was done, in user terms: the annotated graph, the plan dict, and :class:`Report`.

``ParallelModule.report()`` and ``autoseqpar.explain(...)`` return a :class:`Report`. Byte and
FLOP figures are read off the rewritten and partitioned graphs' shapes (exact); times come from
the cost model's roofline on a hardware profile and are labelled as estimates everywhere.
"""
from __future__ import annotations

import collections
import contextlib
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
from tabulate import tabulate

from passes.collectives import FUNCTIONS
from passes.layout import Partial, Shard
from passes.match import META, module_path, placeholder_kind
from passes.propagate import matmul_roles

from .cost_model import tensor_bytes

_KIND_OF_FN = {fn: kind for kind, fn in FUNCTIONS.items()}
_BACKWARD = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather",
             "gather": "own shard", "scatter": "all_gather", "all_reduce": "identity",
             "copy_to_tp": "all_reduce", "grad_sync": "all_reduce"}


def human_bytes(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def decision(n: fx.Node, t: int) -> str:
    """The comment printed on ``n``'s line: what autoseqpar decided for it."""
    meta = n.meta.get(META, {})
    kind = meta.get("kind")
    if n.op == "placeholder":
        shard = meta.get("shard")
        if shard is not None:
            return f"{kind} shard dim {shard.dim}" + (f" ({shard.blocks} blocks)" if shard.blocks > 1 else "") + f", 1/{t} per rank"
        return {"param": "param replicated", "buffer": "buffer", "seeds": "dropout seeds [per-rank, group-wide]"}.get(kind, "")
    if n.op != "call_function":
        return ""
    if n.target in _KIND_OF_FN:
        spec = meta.get("spec")
        where = f" dim {spec.dim}" if isinstance(spec, Shard) else ""
        seq = " seq" if isinstance(spec, Shard) and spec.kind == "seq" else ""
        return f"{meta.get('kind')}{seq}{where} (backward: {_BACKWARD[meta.get('kind')]})"
    layout = meta.get("layout")
    if isinstance(layout, tuple):
        layout = layout[0] if layout else None
    roles = matmul_roles(n) if hasattr(n.target, "overloadpacket") else None
    if roles and isinstance(layout, Partial):
        return "rowwise: partial sums"
    if roles and isinstance(layout, Shard) and layout.kind == "tp" and \
            isinstance(roles[1].meta.get(META, {}).get("shard"), Shard):
        return "colwise"
    if isinstance(layout, Partial):
        return "partial sums"
    if isinstance(layout, Shard):
        label = "seq-shard" if layout.kind == "seq" else "tp-shard"
        return f"{label} dim {layout.dim}"
    return ""


class AnnotatedGraphModule(fx.GraphModule):
    """A GraphModule whose ``str()`` is its code with each decision as a comment on its line."""

    @classmethod
    def wrap(cls, gm: fx.GraphModule, t: int, notes: dict | None = None) -> "AnnotatedGraphModule":
        """``notes``: extra per-node comments (the recompute decisions, by node name)."""
        out = cls(gm, gm.graph)
        out._tp = t
        out._notes = notes or {}
        return out

    def __str__(self) -> str:
        nodes = {n.name: n for n in self.graph.nodes}
        lines = []
        counts = collections.Counter()
        for line in self.code.splitlines():
            m = re.match(r"\s+(\w+) = ", line)
            names = [m.group(1)] if m else []
            if line.lstrip().startswith("def forward("):
                lines.append(line)
                continue
            note = decision(nodes[names[0]], self._tp) if names and names[0] in nodes else ""
            if note:
                counts[note.split(" ")[0]] += 1
            extra = self._notes.get(names[0]) if names else None
            if extra:
                counts[extra.split(" ")[0].rstrip(";")] += 1
                note = f"{note}; {extra}" if note else extra
            lines.append(f"{line:<100}  # {note}" if note else line)
        for n in self.graph.nodes:
            note = decision(n, self._tp) if n.op == "placeholder" else ""
            if note:
                lines.insert(0, f"# {n.name}: {note}")
        lines.append("# totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return "\n".join(lines)


def plan_dict(gm: fx.GraphModule, plan) -> dict:
    """``{module path: "colwise" | "rowwise" | "sequence" | "replicated"}`` for every module
    that owns a parameter (linears by their weight; norms by where they run)."""
    out: dict = {}
    for b in plan.tp.blocks:
        for lin in (*b.columns, *b.rows):
            out[lin.fqn.rsplit(".", 1)[0]] = lin.style
    seq_nodes = set(plan.seq.layouts)
    for n in gm.graph.nodes:
        if placeholder_kind(n) != "param":
            continue
        path = n.meta[META]["fqn"].rsplit(".", 1)[0]
        if path in out:
            continue
        uses = [u for u in n.users]
        in_seq = any(u.name in seq_nodes or u.meta.get(META, {}).get("source") in seq_nodes
                     or any(v.name in seq_nodes for v in u.users) for u in uses)
        out[path] = "sequence" if in_seq else "replicated"
    return dict(sorted(out.items()))


def grad_sync_rows(gm: fx.GraphModule) -> list:
    """(parameter, shape, bytes) of each replicated parameter use on sharded values, whose
    gradient is summed over the group in backward."""
    rows = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _KIND_OF_FN and \
                n.meta[META]["kind"] == "grad_sync":
            rows.append([n.meta[META]["source"], _shape(n),
                         human_bytes(tensor_bytes(n.meta.get("val")))])
    return rows


# ------------------------------------------------------------------------------ Report

CATEGORIES = ("attention", "mlp", "norms", "masks", "other")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "experts")


@dataclass(frozen=True)
class SavedActivation:
    """One value the backward reads from memory, in user terms."""
    name: str  # node of the forward graph that returns it
    shape: tuple
    dtype: str
    bytes: int  # storage it keeps alive (0: a view of another saved value or of a parameter)
    op: str  # the aten op that made it
    module: str  # module path in the user's model ("" outside any module)
    source: str  # "file:line  code" of the user's line that made it ("" when unknown)
    layer: str | None
    category: str  # attention | mlp | norms | masks | other


def _source_line(node: fx.Node | None) -> str:
    trace = (node.meta.get("stack_trace") or "") if node is not None else ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', trace)
    if not frames:
        return ""
    path, line, code = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}  {code.strip()}"


def _user_node(nodes: dict, name) -> fx.Node | None:
    """The rewritten graph's node ``name``; for one a pass inserted (a collective), the user's
    node whose value it moves -- that one has the module path and the source line."""
    node = nodes.get(name)
    if node is not None and not node.meta.get("nn_module_stack"):
        node = nodes.get(node.meta.get(META, {}).get("source"), node)
    return node


def _category(node: fx.Node | None, value_dtype, core: frozenset) -> str:
    if value_dtype == torch.bool or (node is not None and "dropout_mask" in str(node.target)):
        return "masks"
    if node is None:
        return "other"
    if node.name in core:
        return "attention"
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    inner = stack[-1] if stack else ("", "")
    inner_type = str(inner[1]).lower()
    if "norm" in inner_type:
        return "norms"
    path = module_path(node).lower()
    parts = path.split(".")
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    if any(w in p for p in parts for w in _MLP_WORDS) or "mlp" in inner_type:
        return "mlp"
    return "other"


def _dims(pm) -> dict:
    """s, b, h, a of the model (from the example inputs and the graph), for the paper's
    formulas; missing keys where the graph does not show them."""
    dims: dict = {}
    seq_dim = pm.options.seq_dim
    for leaf in pm._captured.example_leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > seq_dim:
            dims["s"], dims["b"] = leaf.shape[seq_dim], leaf.shape[0]
            break
    for n in pm._gm.graph.nodes:
        if getattr(n.target, "overloadpacket", None) is torch.ops.aten.embedding:
            dims["h"] = n.meta["val"].shape[-1]
            break
    for n in pm._gm.graph.nodes:
        p = getattr(n.target, "overloadpacket", None)
        if p is torch.ops.aten.scaled_dot_product_attention:
            dims["a"] = n.args[0].meta["val"].shape[1] * pm.tp
            break
        if p in (torch.ops.aten.softmax, torch.ops.aten._softmax):
            v = n.meta["val"]
            if v.dim() == 4 and v.shape[-1] == v.shape[-2]:
                dims["a"] = v.shape[1] * pm.tp
                break
    return dims


def paper_formulas(s: int, b: int, h: int, a: int, t: int, sp: bool) -> dict:
    """Korthikanti et al.'s activation bytes per layer (16-bit activations, 1-byte dropout
    masks, a 4h GELU MLP) in units of s*b*h/t, for no recompute and selective recompute."""
    if sp:
        return {"none": 34 + 5 * a * s / h, "selective": 34.0, "full": 2.0}
    return {"none": t * (10 + 24 / t + 5 * a * s / (h * t)), "selective": t * (10 + 24 / t),
            "full": 2.0 * t}


@dataclass
class Report:
    """What ``transform`` did (or, from ``explain``, would do) at one tensor-parallel degree.

    ``str(report)`` is a set of tables; every list is also a field for tools (``to_dict()``).
    """
    header: dict
    plan: dict
    layers: list  # per layer: bytes saved by category, total, in s*b*h/t, the paper's formula
    collectives: list  # per collective kind/dim/shape/direction: count, bytes, estimated time
    grad_syncs: list
    decisions: list  # per recomputed op kind: count, bytes not kept, FLOPs and time added
    saved: list  # SavedActivation
    totals: dict
    unknown_ops: dict
    passes: list
    kept_replicated: list
    not_sequence_parallel: list  # norms / dropouts left replicated under SP, with why
    _record: object = field(default=None, repr=False)
    _context: object = field(default=None, repr=False)

    # ------------------------------------------------------------------------ building
    @classmethod
    def of(cls, pm, *, explained: bool = False, context=None) -> "Report":
        from .cost_model import graph_totals
        gm, hw, record = pm._gm, pm.hardware, pm.partitions[-1]
        nodes = {n.name: n for n in gm.graph.nodes}
        core = record.facts.attention_core if record.facts is not None else frozenset()
        dims = _dims(pm)
        saved = []
        for name, shape, dtype, nbytes, layer, src in record.saved:
            maker = nodes.get(src)
            node = _user_node(nodes, src)
            saved.append(SavedActivation(
                name, shape, str(dtype).replace("torch.", ""), nbytes,
                getattr(maker.target, "__name__", str(maker.target)) if maker is not None
                else "?", module_path(node) if node is not None else "", _source_line(node),
                layer, _category(node, dtype, core)))
        fw_t, bw_t = graph_totals(record.fw, hw), graph_totals(record.bw, hw)
        params = sum(p.numel() * p.element_size() for p in pm.parameters())
        header = {
            "model": pm.model_name,
            "tp": pm.tp, "rank": pm.rank, "sequence_parallel": pm.options.sequence_parallel,
            "recompute": record.policy, "hardware": hw.name, "explained": explained,
            "inputs": [list(x.shape) for x in pm._captured.example_leaves
                       if isinstance(x, torch.Tensor)], **dims}
        totals = {
            "parameters_per_rank": sum(p.numel() for p in pm.parameters()),
            "parameter_bytes_per_rank": params,
            "saved_activation_bytes": record.saved_bytes,
            "recompute_flops": record.plan.recompute_flops,
            "step_flops": fw_t["flops"] + bw_t["flops"],
            "comm_bytes_forward": fw_t["comm_bytes"], "comm_bytes_backward": bw_t["comm_bytes"],
            "step_time_estimate_s": fw_t["time_estimate"] + bw_t["time_estimate"],
            "recompute_time_estimate_s": record.plan.recompute_time,
            "solve_seconds": record.seconds,
        }
        unknown = collections.Counter(fw_t["unknown_ops"]) + collections.Counter(bw_t["unknown_ops"])
        return cls(header, pm.plan, _layer_rows(saved, dims, pm.tp, pm.options.sequence_parallel),
                   _collective_rows(record, nodes, hw), grad_sync_rows(gm),
                   _decision_rows(record, nodes, hw), saved, totals, dict(unknown),
                   [{"name": r.name, "seconds": r.seconds, "op_diff": dict(r.op_diff)}
                    for r in pm.pass_log],
                   [{"linear": r.node, "at": r.at, "reason": r.reason}
                    for r in pm._plan.tp.rejected],
                   [{"node": name, "module": path, "reason": why}
                    for name, path, why in pm._plan.seq.replicated], record, context)

    # ------------------------------------------------------------------------- access
    def saved_activations(self) -> list:
        """Each saved value in user terms (shape, dtype, bytes, op, module path, source line),
        largest first."""
        return sorted(self.saved, key=lambda a: -a.bytes)

    def to_dict(self) -> dict:
        """Plain data (JSON-serializable) of every table."""
        out = {k: getattr(self, k) for k in ("header", "plan", "layers", "collectives",
                                             "grad_syncs", "decisions", "totals",
                                             "unknown_ops", "passes", "kept_replicated",
                                             "not_sequence_parallel")}
        out["saved_activations"] = [dict(asdict(a), shape=list(a.shape)) for a in self.saved]
        return _plain(out)

    def pareto(self, points: int = 8) -> list:
        """The memory-vs-recompute trade-off of this graph: the solver re-run on the same joint
        graph for budgets from the least reachable to the no-recompute plan's bytes. Each point:
        ``{"budget", "saved_bytes", "recompute_flops", "recompute_time_estimate_s"}``; plus the
        named policies (``none``, ``paper``, ``full``, ``auto``) as labelled points."""
        from .partition import resolve
        if self._record is None:
            raise ValueError("this report has no partition to re-solve")
        with self._context or contextlib.nullcontext():
            named = {name: resolve(self._record, name) for name in ("none", "paper", "full", "auto")}
            top = named["none"].saved_bytes
            floor = _least_bytes(self._record)
            out = []
            for i in range(points):
                budget = int(floor + (top - floor) * i / max(points - 1, 1))
                plan = resolve(self._record, "none", budget=max(budget, 1))
                out.append(_point(plan, budget=budget))
        out += [_point(p, policy=name) for name, p in named.items()]
        return out

    def plot(self, path: str, points: int = 8) -> str:
        """Draw the Pareto curve (saved activation bytes vs estimated recompute time) to
        ``path`` with matplotlib (``pip install autoseqpar[plot]``). Returns ``path``."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            from .errors import ConfigError
            raise ConfigError("report.plot needs matplotlib: pip install 'autoseqpar[plot]'") \
                from e
        data = self.pareto(points)
        curve = sorted((p for p in data if "policy" not in p), key=lambda p: p["saved_bytes"])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p["saved_bytes"] / 2**20 for p in curve],
                [p["recompute_time_estimate_s"] * 1e3 for p in curve], "o-",
                label="memory_budget sweep")
        for p in data:
            if "policy" in p:
                ax.plot(p["saved_bytes"] / 2**20, p["recompute_time_estimate_s"] * 1e3, "s")
                ax.annotate(p["policy"], (p["saved_bytes"] / 2**20,
                                          p["recompute_time_estimate_s"] * 1e3))
        h = self.header
        ax.set_xlabel("saved activations per rank (MiB, exact)")
        ax.set_ylabel("recompute time (ms, estimate)")
        ax.set_title(f"{h['model']} tp={h['tp']}: memory vs recompute\n({h['hardware']})",
                     fontsize=10)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path

    # ---------------------------------------------------------------------- printing
    def __str__(self) -> str:
        h, t = self.header, self.totals
        est = " (estimate)"
        title = (f"autoseqpar {'explain' if h['explained'] else 'report'}: {h['model']}, "
                 f"tp={h['tp']} (rank {h['rank']}), sequence_parallel={h['sequence_parallel']}, "
                 f"recompute={h['recompute']!r}, hardware profile: {h['hardware']}, "
                 f"inputs {h['inputs']}")
        parts = [title]
        parts.append(tabulate(sorted(collections.Counter(self.plan.values()).items()),
                              headers=["layout", "modules"]))
        parts.append("Saved activations per layer per rank (bytes exact, from the partitioned "
                     "graph)\n" + tabulate(
                         [[r["layer"], *[human_bytes(r[c]) for c in CATEGORIES],
                           human_bytes(r["total"]), r.get("sbh_t", "-"), r.get("paper", "-")]
                          for r in self.layers],
                         headers=["layer", *CATEGORIES, "total", "sbh/t",
                                  "paper (none / selective)"]))
        if self.layers and self.layers[0].get("paper") not in (None, "-"):
            parts[-1] += ("\n(the paper's formula: 16-bit activations, a 4h GELU MLP, dropout; "
                          "other architectures and dtypes differ by design)")
        parts.append("Collectives per step (bytes exact; time" + est + ")\n" + tabulate(
            [[c["direction"], c["kind"], c["dim"], c["count"], c["shape"],
              human_bytes(c["bytes_sent"]), f"{c['time_estimate_s'] * 1e3:.3f}"]
             for c in self.collectives],
            headers=["when", "collective", "dim", "count", "local shape (output)",
                     "sent per rank (total)", "ms" + est]))
        if self.grad_syncs:
            parts.append(f"{len(self.grad_syncs)} replicated parameter uses on sharded values "
                         "get their gradients summed over the group in backward: "
                         + ", ".join(g[0] for g in self.grad_syncs[:6])
                         + (", ..." if len(self.grad_syncs) > 6 else ""))
        if self.decisions:
            shown = self.decisions[:12]
            more = len(self.decisions) - len(shown)
            parts.append("Recompute decisions (FLOPs exact; time" + est + ")\n" + tabulate(
                [[d["op"], d["category"], d["count"], human_bytes(d["bytes"]),
                  human_flops(d["flops"]), f"{d['time_estimate_s'] * 1e3:.3f}"]
                 for d in shown],
                headers=["recomputed op", "category", "count", "not kept", "FLOPs added",
                         "ms added" + est])
                + (f"\n... and {more} cheaper op kinds (report.to_dict()['decisions'])"
                   if more > 0 else ""))
        else:
            parts.append("Recompute decisions: nothing recomputed but views and movement")
        parts.append(tabulate([
            ["parameters per rank", f"{t['parameters_per_rank']:,} "
                                    f"({human_bytes(t['parameter_bytes_per_rank'])})"],
            ["saved activations per rank", human_bytes(t["saved_activation_bytes"])],
            ["step FLOPs per rank", human_flops(t["step_flops"])],
            ["recompute FLOPs", f"{human_flops(t['recompute_flops'])} "
                                f"({100 * t['recompute_flops'] / max(t['step_flops'], 1):.1f}%)"],
            ["collective bytes sent (fwd / bwd)", f"{human_bytes(t['comm_bytes_forward'])} / "
                                                  f"{human_bytes(t['comm_bytes_backward'])}"],
            ["step time" + est, f"{t['step_time_estimate_s'] * 1e3:.2f} ms"],
            ["recompute time" + est, f"{t['recompute_time_estimate_s'] * 1e3:.2f} ms"],
            ["solver time", f"{t['solve_seconds']:.2f} s"]], headers=["totals", ""]))
        if self.unknown_ops:
            parts.append("Ops without a cost formula (elementwise fallback estimate): "
                         + ", ".join(f"{k} x{v}" for k, v in sorted(self.unknown_ops.items())))
        if self.kept_replicated:
            parts.append("Kept replicated (not tensor-parallel)\n" + tabulate(
                [[r["linear"], r["at"], r["reason"]] for r in self.kept_replicated],
                headers=["linear", "at", "why"]))
        if self.not_sequence_parallel:
            parts.append("Norms and dropouts kept replicated (not sequence-parallel)\n" + tabulate(
                [[r["node"], r["module"] or "(top level)", r["reason"]]
                 for r in self.not_sequence_parallel],
                headers=["node", "module", "why"]))
        parts.append(tabulate([[p["name"], f"{p['seconds'] * 1e3:.1f}",
                                ", ".join(f"{k} {v:+d}" for k, v in p["op_diff"].items())]
                               for p in self.passes], headers=["pass", "ms", "op-count diff"]))
        return "\n\n".join(parts)


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return str(x)


def _layer_rows(saved: list, dims: dict, t: int, sp: bool) -> list:
    per: dict = {}
    for a in saved:
        row = per.setdefault(a.layer or "(outside layers)",
                             {"layer": a.layer or "(outside layers)",
                              **{c: 0 for c in CATEGORIES}, "total": 0})
        row[a.category] += a.bytes
        row["total"] += a.bytes
    formula = None
    if all(k in dims for k in "sbha"):
        f = paper_formulas(dims["s"], dims["b"], dims["h"], dims["a"], t, sp)
        formula = f"{f['none']:.1f} / {f['selective']:.1f}"
    rows = sorted(per.values(), key=lambda r: _layer_sort_key(r["layer"]))
    for r in rows:
        if "s" in dims and "h" in dims and r["layer"] != "(outside layers)":
            r["sbh_t"] = round(r["total"] / (dims["s"] * dims["b"] * dims["h"] / t), 2)
            r["paper"] = formula or "-"
    return rows


def _layer_sort_key(layer: str):
    return (layer == "(outside layers)",
            [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", layer)])


def _collective_rows(record, ours: dict, hw) -> list:
    """Functional collectives in the partitioned forward and backward graphs, grouped by
    when they run, kind, dim (user terms, from the rewritten graph's collective; a backward
    conjugate takes its forward partner's) and local shape. ``ours``: the rewritten graph's
    nodes by name."""
    from passes._compat import source_node_name
    from .cost_model import collective_bytes, collective_name, is_collective, node_time
    forward_names = {n.name for n in record.fw.graph.nodes}
    conjugate = {"all_gather_into_tensor": "reduce_scatter_tensor",
                 "reduce_scatter_tensor": "all_gather_into_tensor"}
    dims: dict = {}  # (kind, input shape, output shape) -> dim label, from the forward ones
    rows: dict = {}
    for where, gm in (("forward", record.fw), ("backward", record.bw)):
        for n in gm.graph.nodes:
            if not is_collective(n):
                continue
            kind = collective_name(n)
            shapes = (_shape(n.args[0]), _shape(n))
            mine = ours.get(source_node_name(n))
            spec = mine.meta.get(META, {}).get("spec") if mine is not None else None
            if isinstance(spec, Shard):
                dims[(kind, *shapes)] = f"{spec.kind} dim {spec.dim}"
            label = dims.get((kind, *shapes)) or dims.get(
                (conjugate.get(kind), shapes[1], shapes[0]), "-")
            when = where
            if where == "backward" and n.name in forward_names:
                when = "backward (recompute)"
            key = (when, kind, label, shapes[1])
            row = rows.setdefault(key, {"direction": when, "kind": kind, "dim": label,
                                        "shape": shapes[1], "count": 0, "bytes_sent": 0,
                                        "time_estimate_s": 0.0})
            row["count"] += 1
            row["bytes_sent"] += collective_bytes(n)
            row["time_estimate_s"] += node_time(n, hw)
    order = {"forward": 0, "backward (recompute)": 1, "backward": 2}
    return sorted(rows.values(), key=lambda r: (order[r["direction"]], r["kind"], r["shape"]))


def _shape(n) -> tuple:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _decision_rows(record, ours: dict, hw) -> list:
    """The forward ops the backward runs again, grouped by op and category (views and other
    free ops left out). ``ours``: the rewritten graph's nodes by name."""
    from passes._compat import source_node_name
    from .cost_model import node_cost, node_time, value_bytes
    core = record.facts.attention_core if record.facts is not None else frozenset()
    rows: dict = {}
    for n in record.plan.recomputed:
        cost, seconds = node_cost(n), node_time(n, hw)
        if cost.flops == 0 and seconds == 0:
            continue
        op = getattr(n.target, "__name__", str(n.target))
        mine = _user_node(ours, source_node_name(n))
        cat = _category(mine, n.meta["val"].dtype if isinstance(n.meta.get("val"), torch.Tensor)
                        else None, core)
        row = rows.setdefault((op, cat), {"op": op, "category": cat, "count": 0, "bytes": 0,
                                          "flops": 0, "time_estimate_s": 0.0})
        row["count"] += 1
        row["bytes"] += value_bytes(n)
        row["flops"] += cost.flops
        row["time_estimate_s"] += seconds
    return sorted(rows.values(), key=lambda r: (-r["time_estimate_s"], -r["bytes"]))


def human_flops(flops: int) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops} FLOP"


def _least_bytes(record) -> int:
    from .partition import resolve
    from .solver import InfeasibleBudget
    try:
        return resolve(record, "none", budget=1).saved_bytes
    except InfeasibleBudget as e:
        return e.minimum


def _point(plan, **label) -> dict:
    return {**label, "saved_bytes": plan.saved_bytes, "recompute_flops": plan.recompute_flops,
            "recompute_time_estimate_s": plan.recompute_time}


def recompute_notes(record) -> dict:
    """``{rewritten-graph node name: "save 1.00 MiB" | "recompute"}`` from a partition: the
    saves that hold activation memory and the recomputed ops that cost something (views,
    factories and parameter aliases are left out)."""
    from passes._compat import source_node_name
    from .cost_model import is_collective, node_cost
    notes: dict = {}
    saved: dict = collections.Counter()
    for *_, nbytes, _layer, src in record.saved:
        if src is not None and nbytes:
            saved[src] += nbytes
    for n in record.plan.recomputed:
        src = source_node_name(n)
        if src is not None and (node_cost(n).flops or is_collective(n)):
            notes[src] = "recompute"
    for src, nbytes in saved.items():
        notes[src] = f"save {human_bytes(nbytes)}" + ("; recompute" if src in notes else "")
    return notes
