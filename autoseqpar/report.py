"""What was done, in user terms: the annotated graph, the plan dict, the report tables."""
from __future__ import annotations

import collections
import re

import torch
import torch.fx as fx
from tabulate import tabulate

from passes.collectives import FUNCTIONS
from passes.layout import Partial, Shard
from passes.match import META, placeholder_kind
from passes.propagate import matmul_roles

_KIND_OF_FN = {fn: kind for kind, fn in FUNCTIONS.items()}
_BACKWARD = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather",
             "gather": "own shard", "scatter": "all_gather", "all_reduce": "identity",
             "copy_to_tp": "all_reduce", "grad_sync": "all_reduce"}


def human_bytes(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _nbytes(v) -> int:
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


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
    def wrap(cls, gm: fx.GraphModule, t: int) -> "AnnotatedGraphModule":
        out = cls(gm, gm.graph)
        out._tp = t
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


def collectives_table(gm: fx.GraphModule) -> tuple[list, list]:
    """Rows for the activation collectives, and for the replicated gradients summed in
    backward (both from the rewritten graph's shapes: exact)."""
    acts, grads = [], []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _KIND_OF_FN:
            meta = n.meta[META]
            spec = meta.get("spec")
            val = n.meta.get("val")
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else ""
            if meta["kind"] == "grad_sync":
                grads.append([meta["source"], shape, human_bytes(_nbytes(val))])
                continue
            acts.append([n.name, meta["kind"], spec.dim if isinstance(spec, Shard) else "-",
                         shape, human_bytes(_nbytes(val)), _BACKWARD[meta["kind"]]])
    return acts, grads


def parallel_report(pm) -> str:
    """The report of a ParallelModule: plan, collectives, passes."""
    gm = pm._gm
    plan_rows = collections.Counter(pm.plan.values())
    parts = [f"autoseqpar: tp={pm.tp}, sequence_parallel={pm.options.sequence_parallel}, "
             f"rank {pm.rank}"]
    parts.append(tabulate(sorted(plan_rows.items()), headers=["layout", "modules"]))
    acts, grads = collectives_table(gm)
    parts.append(tabulate(acts, headers=["node", "collective", "dim", "local shape (output)",
                                         "bytes (output)", "backward"]))
    if grads:
        total = sum(_nbytes(n.meta.get("val")) for n in gm.graph.nodes
                    if n.meta.get(META, {}).get("kind") == "grad_sync" and n.op == "call_function")
        parts.append(f"{len(grads)} replicated parameter uses on sharded values get their "
                     f"gradients summed over the group in backward ({human_bytes(total)} "
                     "all-reduced per step): " + ", ".join(g[0] for g in grads[:6])
                     + (", ..." if len(grads) > 6 else ""))
    parts.append(tabulate([[r.name, f"{r.seconds * 1e3:.1f}",
                            ", ".join(f"{k} {v:+d}" for k, v in r.op_diff.items())]
                           for r in pm.pass_log], headers=["pass", "ms", "op-count diff"]))
    for part in pm.partitions:
        per_layer: dict = {}
        for _, _, _, nbytes, layer, _ in part.saved:
            per_layer[layer or "(outside layers)"] = per_layer.get(layer or "(outside layers)", 0) + nbytes
        plan = part.plan
        parts.append(
            f"recompute policy {part.policy!r}: {human_bytes(part.saved_bytes)} of activations "
            f"saved for backward (exact, from the partitioned graph); recompute adds "
            f"{plan.recompute_flops / 1e9:.3f} GFLOP (exact count) and an estimated "
            f"{plan.recompute_time * 1e3:.2f} ms on the {pm.hardware.name} profile; solved in "
            f"{part.seconds:.2f} s ({plan.solves} min-cuts)\n"
            + tabulate(sorted(per_layer.items(), key=lambda kv: str(kv[0])),
                       headers=["layer", "saved bytes (exact)"]))
    rejected = pm._plan.tp.rejected
    if rejected:
        parts.append("kept replicated (not tensor-parallel):\n" + tabulate(
            [[r.node, r.at, r.reason] for r in rejected], headers=["linear", "at", "why"]))
    return "\n\n".join(parts)
