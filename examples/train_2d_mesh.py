"""Tensor + sequence parallelism (autoseqpar) inside data parallelism on a 2-D DeviceMesh.

    torchrun --nproc-per-node 4 examples/train_2d_mesh.py [--dp 2] [--tp 2] [--steps 4] [--fsdp]

The mesh is (dp, tp) with tp inside: ranks 0,1 and 2,3 each hold one tensor-parallel copy of
GPT-2 (autoseqpar over ``mesh["tp"]``), and DDP averages the gradients between the copies over
``mesh["dp"]`` (``--fsdp``: FSDP2's ``fully_shard`` instead, which also shards each TP shard's
parameters, gradients and optimizer state over ``mesh["dp"]``). Each dp rank trains on its slice of the global batch. Every rank also trains an
untouched copy of the model on the whole global batch; the example prints the largest
difference of the step-1 gradients (gathered from the TP shards), of the global loss at each step
and of the weights after training, and exits non-zero if any exceeds fp32 round-off.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from tabulate import tabulate
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import GPT2Config, GPT2LMHeadModel

import autoseqpar
from train_gpt2 import batches

GRAD_RTOL, LOSS_ATOL, WEIGHT_ATOL = 2e-5, 1e-5, 1e-4
CLIP = 0.5  # max grad norm: small enough that every step is clipped


def largest_difference(got: dict, want: dict, relative: bool = False) -> float:
    """The largest elementwise |got - want| over all entries; with ``relative``, each entry's
    difference is divided by the largest |want| of that entry."""
    worst = 0.0
    for name, w in want.items():
        d = (got[name] - w).abs().max().item()
        worst = max(worst, d / max(w.abs().max().item(), 1e-12) if relative else d)
    return worst


def mesh_layout(mesh, dp_method: str) -> str:
    """Which global ranks form each tp group (rows) and each dp group (columns)."""
    ranks = mesh.mesh.tolist()
    tp_groups = " ".join(str(row) for row in ranks)
    dp_groups = " ".join(str(list(col)) for col in zip(*ranks))
    return (f"mesh {tuple(mesh.mesh.shape)} (dp, tp) of global ranks {ranks}: "
            f"tp groups (autoseqpar) {tp_groups}; dp groups ({dp_method}) {dp_groups}")


def data_parallel(pmodel, mesh, fsdp: bool):
    """``pmodel`` made data-parallel over ``mesh["dp"]``: the module to train."""
    if fsdp:
        return fully_shard(pmodel, mesh=mesh["dp"])  # pmodel itself, its shards now DTensors
    return DistributedDataParallel(pmodel, process_group=mesh["dp"].get_group())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="global batch, split over dp")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--fsdp", action="store_true",
                    help="FSDP2 fully_shard over dp instead of DDP")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (args.dp, args.tp), mesh_dim_names=("dp", "tp"))
    rank, dp_rank = dist.get_rank(), mesh["dp"].get_local_rank()
    local = args.batch // args.dp
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=args.seq,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    reference = copy.deepcopy(model)  # trained on the whole global batch, untouched by autoseqpar

    data = list(batches(config.vocab_size, args.batch, args.seq, args.steps))
    mine = [ids[dp_rank * local:(dp_rank + 1) * local] for ids in data]
    pmodel = autoseqpar.transform(model, ((mine[0],), {"labels": mine[0]}), tp=args.tp,
                                  group=mesh["tp"].get_group())
    params = sum(p.numel() for p in pmodel.parameters())
    dp_model = data_parallel(pmodel, mesh, args.fsdp)
    opt = torch.optim.AdamW(dp_model.parameters(), lr=3e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=3e-3)

    rows, grad_diff, norms = [], None, []
    for step, (ids, full) in enumerate(zip(mine, data), start=1):
        loss = dp_model(ids, labels=ids).loss  # local slice's mean; grads averaged over dp
        loss.backward()
        ref_loss = reference(full, labels=full).loss
        ref_loss.backward()
        if grad_diff is None:  # a collective: every rank calls it (pmodel is DDP's .module)
            grads = pmodel.gather_grads()
            grad_diff = largest_difference(
                grads, {n: p.grad for n, p in reference.named_parameters()}, relative=True)
        # the true global norm over tp shards (and FSDP2's dp shards), clipped like the reference
        norms.append((pmodel.clip_grad_norm_(CLIP).item(),
                      torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP).item()))
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=mesh["dp"].get_group())
        global_loss /= args.dp
        rows.append((step, global_loss.item(), ref_loss.item(),
                     abs(global_loss.item() - ref_loss.item()), *norms[-1]))

    loss_diff = max(r[3] for r in rows)
    norm_diff = max(abs(a - b) / b for a, b in norms)
    state = pmodel.gather_state_dict()  # collective, like gather_grads
    weight_diff = largest_difference(state, reference.state_dict())
    if rank == 0:
        print(mesh_layout(mesh, "FSDP2" if args.fsdp else "DDP"))
        print(f"GPT-2 2 layers, h=32: {params:,} of "
              f"{sum(p.numel() for p in reference.parameters()):,} parameters in each TP "
              f"shard; global batch {args.batch} x {args.seq}, {local} sequences per dp rank\n")
        print(tabulate(rows, headers=["step", "global loss (dp mean)", "single-process loss",
                                      "|diff|", "grad norm", "single-process grad norm"],
                       floatfmt=("d", ".6f", ".6f", ".2e", ".6f", ".6f")))
        print(f"\nlargest gradient difference (step 1, relative to each tensor's largest): "
              f"{grad_diff:.2e}")
        print(f"largest loss difference over {args.steps} steps: {loss_diff:.2e}")
        print(f"largest relative grad-norm difference (clipped at {CLIP}): {norm_diff:.2e}")
        print(f"largest weight difference after training: {weight_diff:.2e}")
        print(f"\n{pmodel.report()}")
    dist.destroy_process_group()
    if grad_diff > GRAD_RTOL or loss_diff > LOSS_ATOL or weight_diff > WEIGHT_ATOL or \
            norm_diff > GRAD_RTOL:
        raise SystemExit(f"rank {rank}: 2-D mesh training differs from the single process "
                         f"(gradients {grad_diff:.2e}, loss {loss_diff:.2e}, "
                         f"grad norm {norm_diff:.2e}, weights {weight_diff:.2e})")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
