"""Saved activation bytes per layer per rank against Korthikanti et al.'s formulas, one process.

    python benchmarks/paper_formulas.py [--seq 512 --batch 2 --hidden 1024 --heads 16 --layers 4 --tp 2 4 8]

For each TP degree (a fake process group plays the ranks: the graphs, not the numbers, are what
is measured) it transforms the nanoGPT-style model (explicit softmax attention, dropout 0.1,
bf16) with each recompute option and prints the bytes the partitioned graph saves per layer, in
units of sbh/t, beside the paper's formula, plus the recompute's share of the step's FLOPs
(exact count) and of its estimated time (cost-model estimate, CPU profile).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import autoseqpar  # noqa: E402
from autoseqpar.solver import CostCache, classify, step_totals  # noqa: E402
from models import NanoGPT  # noqa: E402
from passes._compat import fake_process_group_store  # noqa: E402


def formula(mode: str, sp: bool, s, h, a, t) -> str:
    if mode == "full":
        return "2"
    if not sp:
        return f"{t * (10 + 24 / t + 5 * a * s / (h * t)):.1f}"
    if mode == "paper":
        return "34"
    if mode == "none":
        return f"{34 + 5 * a * s / h:.1f}"
    return "<= 34 (target 24)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    a = ap.parse_args()
    s, b, h, n, L = a.seq, a.batch, a.hidden, a.heads, a.layers
    rows = []
    for t in a.tp:
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", rank=0, world_size=t, store=fake_process_group_store())
        for sp, mode in ((True, "none"), (True, "paper"), (True, "auto"), (True, "full"),
                         (False, "none")):
            torch.manual_seed(0)
            model = NanoGPT(vocab_size=256, block_size=s, n_layer=L, n_head=n, n_embd=h,
                            dropout=0.1).to(torch.bfloat16)
            ids = torch.randint(0, 256, (b, s))
            pm = autoseqpar.transform(model, ((ids, ids), {}), sequence_parallel=sp,
                                      recompute=mode)
            part = pm.partitions[-1]
            per: dict = {}
            for *_, nbytes, layer, _src in part.saved:
                if layer is not None:
                    per[layer] = per.get(layer, 0) + nbytes
            unit = s * b * h / t
            layers = [per[k] / unit for k in sorted(per)]
            totals = step_totals(classify(part.joint, part.num_fwd_outputs), CostCache(pm.hardware))
            rows.append([t, "SP" if sp else "TP only", mode,
                         " ".join(f"{x:.2f}" for x in layers), f"{sum(layers) / len(layers):.2f}",
                         formula(mode, sp, s, h, n, t),
                         f"{100 * part.plan.recompute_flops / totals.step_flops:.2f}%",
                         f"{100 * part.plan.recompute_time / totals.step_time:.2f}%"])
    dist.destroy_process_group()
    print(f"nanoGPT s={s} b={b} h={h} a={n}, {L} layers, bf16, dropout 0.1; bytes from the "
          "partitioned graphs (exact); time share is a cost-model estimate (CPU profile)")
    print(tabulate(rows, headers=["t", "layout", "recompute", "sbh/t per layer", "mean",
                                  "paper's formula", "recompute FLOPs", "recompute time (est.)"]))


if __name__ == "__main__":
    main()
