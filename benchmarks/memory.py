"""Saved activation memory, recompute FLOPs and communication, side by side, in one run.

    torchrun --nproc-per-node 2 benchmarks/memory.py [--seq 256 --hidden 512 --heads 8]

Every figure is measured in this run on this machine:

* saved MiB per layer per rank: the distinct storages autograd keeps for backward
  (``torch.autograd.graph.saved_tensors_hooks``), parameters and inputs excluded, for a model
  with 3 layers minus the same model with 1 layer, halved -- so embeddings, head and loss drop
  out. bf16 activations.
* recompute FLOPs: ``torch.utils.flop_counter`` over forward+backward (with the CPU fused
  attention counted like the CUDA one, as the cost model does), against the same
  method's no-recompute run (eager for PyTorch's methods, ``recompute="none"`` for autoseqpar).
* comm per layer: bytes one rank sends per step, from the partitioned graphs (autoseqpar; not
  measured for DTensor).
* grads: the largest gradient difference against that no-recompute reference, same seed,
  dropout on where the model has it (0.1): ``wrong`` where it exceeds bf16 round-off.

Baselines: eager; ``torch.utils.checkpoint`` per layer; a hand-written checkpoint of the
attention core (nanoGPT); torch.compile's min-cut partitioner, also under
``activation_memory_budget`` 0.5 and 0.1; DTensor's hand-written TP+SP plan (Llama, torchtitan
style). Then autoseqpar at t=2: ``none``, ``paper``, the default and a budget sweep; and the
partition-solve seconds for 12- and 48-layer models against ``min_cut_rematerialization_partition``
on the same joint graph.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import sys
import time

import torch
import torch.distributed as dist
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import autoseqpar  # noqa: E402
from autoseqpar.cost_model import (EXTRA_FLOP_FORMULAS, HARDWARE, collective_bytes,  # noqa: E402
                                   graph_totals)
from models import NanoGPT, hf_gpt2, hf_llama  # noqa: E402

MiB = 2 ** 20


# ------------------------------------------------------------------------------ models

def build(name: str, layers: int, a) -> tuple:
    torch.manual_seed(0)
    if name == "nanogpt":
        m = NanoGPT(vocab_size=256, block_size=a.seq, n_layer=layers, n_head=a.heads,
                    n_embd=a.hidden, dropout=0.1)
        loss = lambda m, ids: m(ids, ids)[1]  # noqa: E731
    elif name == "gpt2":
        m = hf_gpt2(n_layer=layers, n_embd=a.hidden, n_head=a.heads, vocab=256,
                    positions=a.seq, dropout=0.1)
        loss = lambda m, ids: m(ids, labels=ids).loss  # noqa: E731
    else:
        m = hf_llama(n_layer=layers, hidden=a.hidden, heads=a.heads, kv_heads=a.heads // 2,
                     vocab=256, positions=a.seq)
        loss = lambda m, ids: m(ids, labels=ids).loss  # noqa: E731
    ids = torch.randint(0, 256, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    return m.to(torch.bfloat16), ids, loss


def example(name, ids):
    return ((ids, ids), {}) if name == "nanogpt" else ((ids,), {"labels": ids})


# --------------------------------------------------------------------------- measuring

def measure(step, params, ids, count_flops: bool = True) -> dict:
    """Saved bytes (distinct storages, parameters and inputs excluded), FLOPs and gradients of
    one forward+backward ``step()``."""
    skip = {_local(p).untyped_storage().data_ptr() for p in params} | {
        ids.untyped_storage().data_ptr()}
    seen: dict = {}

    def pack(t):
        t = _local(t)
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    # one warm-up step first: torch.compile compiles here, outside the hooks and the flop
    # counter (under either, dynamo would run the model eagerly); every method then measures
    # its second step
    torch.manual_seed(123)
    step().backward()
    flops = None
    if count_flops:
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as fc:
            torch.manual_seed(123)
            step().backward()
        flops = fc.get_total_flops()
    for p in params:
        p.grad = None
    torch.manual_seed(123)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return {"saved": sum(seen.values()), "flops": flops,
            "grads": [_local(p.grad).detach().float().clone() if p.grad is not None else None
                      for p in params]}


def _local(t):
    """A DTensor's local shard (what this rank holds), else the tensor."""
    from torch.distributed.tensor import DTensor
    if isinstance(t, DTensor):
        with torch.no_grad():
            return t.to_local()
    return t


def grad_diff(a: list, b: list) -> float:
    return max(((x - y).abs().max().item() for x, y in zip(a, b)
                if x is not None and y is not None), default=float("nan"))


# ------------------------------------------------------------------ PyTorch's own methods

def checkpointed(name, model):
    """Each transformer layer under torch.utils.checkpoint (non-reentrant, RNG preserved)."""
    from torch.utils.checkpoint import checkpoint
    layers = model.h if name == "nanogpt" else (
        model.transformer.h if name == "gpt2" else model.model.layers)
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return model


def core_checkpointed(model):
    """nanoGPT with its attention core (QK^T, softmax, dropout, .V) under checkpoint by hand."""
    import math
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    for block in model.h:
        attn = block.attn

        def core(q, k, v, attn=attn):
            T = q.size(-2)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(attn.bias[:, :, :T, :T] == 0, float("-inf"))
            return attn.attn_dropout(F.softmax(att, dim=-1)) @ v

        def forward(x, attn=attn, core=core):
            B, T, C = x.size()
            q, k, v = attn.c_attn(x).split(attn.n_embd, dim=2)
            q, k, v = (z.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
                       for z in (q, k, v))
            y = checkpoint(core, q, k, v, use_reentrant=False)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return attn.resid_dropout(attn.c_proj(y))

        attn.forward = forward
    return model


def compiled(model, budget=None):
    """torch.compile through AOTAutograd with PyTorch's min-cut partitioner (eager kernels, so
    the flop counter sees every op); ``budget`` sets ``activation_memory_budget``."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs: list = []

    def keep(g, _inputs):
        graphs.append(g)
        return make_boxed_func(g)

    backend = aot_autograd(fw_compiler=keep, partition_fn=min_cut_rematerialization_partition)
    opt = torch.compile(model, backend=backend, dynamic=False)
    opt.graphs = graphs  # forward and backward graphs, for counting their FLOPs
    if budget is None:
        return opt, contextlib.nullcontext
    import torch._functorch.config as fconfig
    return opt, functools.partial(fconfig.patch, activation_memory_budget=budget)


def single_process_rows(name, a) -> list:
    rows = []
    results = {}
    for label, make in [
        ("eager", lambda m: (m, contextlib.nullcontext)),
        ("checkpoint per layer", lambda m: (checkpointed(name, m), contextlib.nullcontext)),
        ("hand-written attention-core checkpoint",
         (lambda m: (core_checkpointed(m), contextlib.nullcontext)) if name == "nanogpt" else None),
        ("torch.compile min-cut partitioner", lambda m: compiled(m)),
        ("torch.compile activation_memory_budget=0.5", lambda m: compiled(m, 0.5)),
        ("torch.compile activation_memory_budget=0.1", lambda m: compiled(m, 0.1)),
    ]:
        if make is None:
            rows.append([name, label, "n/a (fused SDPA: no s^2 tensors to checkpoint)", "", "", ""])
            continue
        per = {}
        for layers in (1, 3):
            model, ids, loss = build(name, layers, a)
            runner, ctx = make(model)
            graphs = getattr(runner, "graphs", None)
            with ctx():
                per[layers] = measure(lambda: loss(runner, ids), list(model.parameters()), ids,
                                      count_flops=graphs is None)
            if graphs is not None:  # the flop counter cannot see inside compiled graphs
                per[layers]["flops"] = sum(graph_totals(g, HARDWARE["cpu"])["flops"]
                                           for g in graphs)  # every forward and backward graph
        results[label] = per
        saved = (per[3]["saved"] - per[1]["saved"]) / 2
        base = results["eager"]
        extra = per[3]["flops"] / base[3]["flops"] - 1
        diff = grad_diff(per[3]["grads"], base[3]["grads"])
        rows.append([name, label, f"{saved / MiB:.2f}", f"{100 * extra:+.1f}%", "-",
                     "yes" if diff <= 2e-2 else f"WRONG (max diff {diff:.2g})"])
    return rows


# --------------------------------------------------------------------------- autoseqpar

def autoseqpar_rows(name, a) -> list:
    rows = []
    specs = [("none", {"recompute": "none"}), ("paper", {"recompute": "paper"}),
             ("default (auto)", {})] + [
        (f"memory_budget={f}", {"memory_budget": f}) for f in (0.6, 0.4, 0.2)]
    ref = {}
    for label, opts in specs:
        per, comm = {}, {}
        for layers in (1, 3):
            model, ids, loss = build(name, layers, a)
            try:
                pm = autoseqpar.transform(model, example(name, ids), seed=5, **opts)
            except autoseqpar.MemoryBudgetError as e:
                per = None
                rows.append([name, f"autoseqpar t=2 {label}", f"infeasible: {e.minimum} B", "", "", ""])
                break
            # the flop counter's module hooks do not attach to AOTAutograd's outputs: count the
            # partitioned graphs' ops with the same flop_counter formulas instead
            per[layers] = measure(lambda: loss(pm, ids), list(pm.parameters()), ids, False)
            part = pm.partitions[-1]
            per[layers]["flops"] = sum(graph_totals(g, pm.hardware)["flops"]
                                       for g in (part.fw, part.bw))
            comm[layers] = sum(collective_bytes(n) for g in (part.fw, part.bw)
                               for n in g.graph.nodes if n.op == "call_function")
        if per is None:
            continue
        if label == "none":
            ref = per
        saved = (per[3]["saved"] - per[1]["saved"]) / 2
        extra = per[3]["flops"] / ref[3]["flops"] - 1
        diff = grad_diff(per[3]["grads"], ref[3]["grads"])
        rows.append([name, f"autoseqpar t=2 {label}", f"{saved / MiB:.2f}", f"{100 * extra:+.1f}%",
                     f"{(comm[3] - comm[1]) / 2 / MiB:.2f} MiB",
                     "yes" if diff <= 2e-2 else f"WRONG (max diff {diff:.2g})"])
    return rows


def dtensor_rows(a) -> list:
    """torchtitan's Llama plan written by hand for HF Llama: TP + SP over 2 ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel,
                                                   parallelize_module)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    per = {}
    for layers in (1, 3):
        model, ids, loss = build("llama", layers, a)
        # The embedding stays replicated (HF builds the causal mask from its output's length,
        # which must be the full sequence); the first norm shards the sequence; row-parallel
        # outputs stay DTensors so the residual adds can mix layouts.
        plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(),
                                                      output_layouts=Replicate(),
                                                      use_local_output=False),
                "model.norm": SequenceParallel(),
                "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
        for i in range(layers):
            p = f"model.layers.{i}"
            plan.update({
                f"{p}.input_layernorm": SequenceParallel(),
                f"{p}.self_attn": PrepareModuleInput(
                    input_kwarg_layouts={"hidden_states": Shard(1)},
                    desired_input_kwarg_layouts={"hidden_states": Replicate()}),
                f"{p}.self_attn.q_proj": ColwiseParallel(),
                f"{p}.self_attn.k_proj": ColwiseParallel(),
                f"{p}.self_attn.v_proj": ColwiseParallel(),
                f"{p}.self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1),
                                                         use_local_output=False),
                f"{p}.post_attention_layernorm": SequenceParallel(),
                f"{p}.mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                               desired_input_layouts=(Replicate(),)),
                f"{p}.mlp.gate_proj": ColwiseParallel(),
                f"{p}.mlp.up_proj": ColwiseParallel(),
                f"{p}.mlp.down_proj": RowwiseParallel(output_layouts=Shard(1),
                                                      use_local_output=False)})
        try:
            parallelize_module(model, mesh, plan)
            per[layers] = measure(lambda: loss(model, ids), list(model.parameters()), ids,
                                  count_flops=False)
        except Exception as e:  # report, do not hide, a plan the installed torch refuses
            if os.environ.get("BENCH_DEBUG"):
                raise
            return [["llama", "DTensor hand-written TP+SP (t=2)",
                     f"failed: {type(e).__name__}: {str(e)[:60]}", "", "", ""]]
    saved = (per[3]["saved"] - per[1]["saved"]) / 2
    return [["llama", "DTensor hand-written TP+SP (t=2)", f"{saved / MiB:.2f}", "+0.0% (none)",
             "-", "(not compared)"]]


# ------------------------------------------------------------------------- solve times

def solve_time_rows() -> list:
    from functorch.compile import min_cut_rematerialization_partition
    rows = []
    for layers in (12, 48):
        torch.manual_seed(0)
        model = NanoGPT(vocab_size=256, block_size=128, n_layer=layers, n_head=4, n_embd=128,
                        dropout=0.1)
        ids = torch.randint(0, 256, (2, 128))
        pm = autoseqpar.transform(model, ((ids, ids), {}))
        part = pm.partitions[-1]
        ours = part.seconds
        joint = copy.deepcopy(part.joint)
        start = time.perf_counter()
        min_cut_rematerialization_partition(joint, None, num_fwd_outputs=part.num_fwd_outputs)
        theirs = time.perf_counter() - start
        rows.append([layers, len(part.joint.graph.nodes), f"{ours:.2f}", part.plan.solves,
                     f"{theirs:.2f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--models", default="nanogpt,gpt2,llama")
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    rows = []
    for name in a.models.split(","):
        if rank == 0:
            rows += single_process_rows(name, a)
        dist.barrier()
        rows += autoseqpar_rows(name, a)
        if name == "llama":
            rows += dtensor_rows(a)
    solve = solve_time_rows()
    if rank == 0:
        s, b, h, n = a.seq, a.batch, a.hidden, a.heads
        print(f"s={s} b={b} h={h} a={n}, bf16, CPU; per layer per rank; "
              f"sbh = {s * b * h * 2 / MiB:.2f} MiB of bf16 (1 sbh unit = {s * b * h / MiB:.3f} MiB)")
        print(tabulate(rows, headers=["model", "method", "saved MiB / layer / rank",
                                      "recompute FLOPs", "comm / layer / rank", "grads match"]))
        print()
        print("partition-solve seconds on the same joint graph (nanoGPT, h=128, s=128, t=2):")
        print(tabulate(solve, headers=["layers", "joint nodes", "autoseqpar s", "min-cut solves",
                                       "min_cut_rematerialization_partition s"]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
