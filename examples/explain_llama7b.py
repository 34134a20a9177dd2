"""What autoseqpar would do to Llama-2-7B at tp=8, in one process, with no GPUs and no memory.

    python examples/explain_llama7b.py [--tp 8] [--seq 2048] [--batch 1] [--hardware h100] [--layers 32]

The model is ``transformers.LlamaConfig()``'s defaults (the 7B shape: hidden 4096, 32 layers,
32 heads, intermediate 11008, vocab 32000) in bf16, built on the meta device: no weights are
allocated. ``autoseqpar.explain`` runs ``transform``'s passes and the recompute solver on a fake
process group of ``--tp`` ranks and returns the report: the plan, saved activation bytes per
layer per rank (exact, from the partitioned graph's shapes), the collectives, what is
recomputed, and step and recompute times (estimates on the ``--hardware`` profile). The
example prints it and the largest values the backward keeps, each with the user's module and
source line that made it.
"""
from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate
from transformers import LlamaConfig, LlamaForCausalLM

import autoseqpar
from autoseqpar.report import human_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hardware", default="h100", help="cost-model profile: a100 h100 h200 cpu")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()

    cfg = LlamaConfig(num_hidden_layers=args.layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        ids = torch.zeros(args.batch, args.seq, dtype=torch.int64)
    params = sum(p.numel() for p in model.parameters())
    print(f"LlamaForCausalLM (LlamaConfig() defaults, {args.layers} layers): {params:,} "
          f"parameters ({human_bytes(2 * params)} in bf16), built on the meta device")

    start = time.perf_counter()
    report = autoseqpar.explain(model, ((ids,), {"labels": ids}), tp=args.tp,
                                hardware=args.hardware)
    print(f"autoseqpar.explain at tp={args.tp}, batch {args.batch} x seq {args.seq}: "
          f"{time.perf_counter() - start:.1f} s (measured, one process, no process group)\n")
    print(report)

    print("\nLargest saved activations per rank (exact)")
    print(tabulate([[a.shape, a.dtype, human_bytes(a.bytes), a.op, a.module, a.source]
                    for a in report.saved_activations()[:10]],
                   headers=["shape", "dtype", "bytes", "op", "module", "source line"]))


if __name__ == "__main__":
    main()
