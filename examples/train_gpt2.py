"""Train HuggingFace GPT-2 tensor + sequence parallel on 2 CPU ranks, beside the original.

    torchrun --nproc-per-node 2 examples/train_gpt2.py [--steps 8] [--layers 2]

Every rank builds the same GPT-2 (same seed), transforms it with autoseqpar, and trains it with
AdamW; for comparison, every rank also trains an untouched copy of the model in-process. The
two loss curves are printed side by side: they are the same function, so they fall together.
Then rank 0 prints the detected plan, an excerpt of the rewritten graph (each decision as a
comment) and the report.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

import autoseqpar


def batches(vocab: int, batch: int, seq: int, steps: int, seed: int = 0):
    """A learnable synthetic corpus: each sequence counts upward by a random stride."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        stride = torch.randint(1, 4, (batch, 1), generator=g)
        yield (start + stride * torch.arange(seq)) % vocab


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--no-sp", action="store_true", help="plain TP (all-reduce) instead of SP")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads,
                        vocab_size=128, n_positions=args.seq, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    reference = copy.deepcopy(model)  # trained in-process, untouched by autoseqpar

    data = list(batches(config.vocab_size, args.batch, args.seq, args.steps))
    pmodel = autoseqpar.transform(model, ((data[0],), {"labels": data[0]}), tp=world,
                                  sequence_parallel=not args.no_sp)
    opt = torch.optim.AdamW(pmodel.parameters(), lr=3e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=3e-3)

    if rank == 0:
        local = sum(p.numel() for p in pmodel.parameters())
        full = sum(p.numel() for p in reference.parameters())
        print(f"GPT-2 {args.layers} layers, h={args.hidden}, {args.heads} heads, "
              f"tp={world}, sequence_parallel={not args.no_sp}: "
              f"{local:,} of {full:,} parameters on each rank (measured)")
        print(f"{'step':>4} {'autoseqpar loss':>16} {'single-process loss':>20} {'|diff|':>9}")
    worst = 0.0
    for step, ids in enumerate(data):
        loss = pmodel(ids, labels=ids).loss
        loss.backward()
        norm = pmodel.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()

        ref_loss = reference(ids, labels=ids).loss
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad()
        worst = max(worst, abs(loss.item() - ref_loss.item()))
        if rank == 0:
            print(f"{step:>4} {loss.item():>16.6f} {ref_loss.item():>20.6f} "
                  f"{abs(loss.item() - ref_loss.item()):>9.2e}   grad norm {norm.item():.4f} "
                  f"vs {ref_norm.item():.4f}")

    state = pmodel.gather_state_dict()  # every rank takes part in the gather
    if rank == 0:
        drift = max((state[k] - v).abs().max().item() for k, v in reference.state_dict().items())
        print(f"\nlargest loss difference over {args.steps} steps: {worst:.2e}; largest weight "
              f"difference after training (gathered state dict vs single-process): {drift:.2e}")
        print("\nplan (module path -> layout):")
        for path, layout in pmodel.plan.items():
            print(f"  {path:<36} {layout}")
        lines = str(pmodel.graph).splitlines()
        start = next(i for i, l in enumerate(lines) if "layer_norm" in l and "=" in l)
        print("\nrewritten graph, first layer (excerpt):")
        print("\n".join(lines[start:start + 24]))
        print(f"\n{pmodel.report()}")
    dist.destroy_process_group()
    if worst > 1e-3:
        raise SystemExit(f"loss curves diverged by {worst}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
