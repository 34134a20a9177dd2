"""The memory-vs-recompute trade-off of one model at tp=2, as a table and a plot.

    python examples/pareto_plot.py [--out pareto.png] [--points 8]

``autoseqpar.explain`` builds what ``transform`` would at tp=2 (one process, a fake process
group, fake tensors), and ``report.pareto(points)`` re-runs the recompute solver on the same
joint forward+backward graph for memory budgets from the least reachable to what the
no-recompute plan keeps, plus the named policies (none, paper, full, auto). Saved bytes and
recompute FLOPs are exact (from the partitioned graphs' shapes); recompute times are cost-model
estimates on the H100 profile. ``report.plot(out)`` draws the curve (needs matplotlib:
``pip install 'autoseqpar[plot]'``; without it the table is still printed).
"""
from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate
from transformers import GPT2Config, GPT2LMHeadModel

import autoseqpar
from autoseqpar.report import human_bytes, human_flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="pareto.png")
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()

    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads,
                        n_positions=args.seq, vocab_size=1024, bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
        ids = torch.zeros(args.batch, args.seq, dtype=torch.int64)
    start = time.perf_counter()
    report = autoseqpar.explain(model, ((ids,), {"labels": ids}), tp=2, hardware="h100")
    explained = time.perf_counter() - start
    points = report.pareto(args.points)
    print(f"GPT-2 {args.layers} layers, h={args.hidden}, {args.heads} heads, batch {args.batch} x "
          f"seq {args.seq}, fp32, dropout 0.1, tp=2: explain {explained:.1f} s, pareto "
          f"{time.perf_counter() - start - explained:.1f} s (measured)\n")
    print(tabulate([[p.get("policy") or human_bytes(p["budget"]), human_bytes(p["saved_bytes"]),
                     human_flops(p["recompute_flops"]),
                     f"{p['recompute_time_estimate_s'] * 1e6:.1f}"] for p in points],
                   headers=["memory_budget / policy", "saved per rank (exact)",
                            "recompute FLOPs (exact)", "recompute us (estimate, h100)"]))
    try:
        print(f"\nplot written to {report.plot(args.out, args.points)}")
    except autoseqpar.ConfigError as e:
        print(f"\nno plot: {e}")


if __name__ == "__main__":
    main()
