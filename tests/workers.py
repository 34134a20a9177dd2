"""Functions run on every rank by the multi-process tests (importable by spawned children)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import autoseqpar
from cases import build


def parity(rank: int, world: int, names: list, sp_modes: list) -> dict:
    """For each case and mode: max |difference| of loss, output and every gathered gradient
    against the unmodified model run in this process."""
    out = {}
    for name in names:
        for sp in sp_modes:
            case, model, args, kwargs = build(name, world)
            ref_out = model(*args, **kwargs)
            ref_loss = case.loss(ref_out)
            ref_loss.backward()
            ref_grads = {n: p.grad for n, p in model.named_parameters()}
            model.zero_grad()
            pm = autoseqpar.transform(model, (args, kwargs), sequence_parallel=sp)
            got = pm(*args, **kwargs)
            loss = case.loss(got)
            loss.backward()
            grads = pm.gather_grads()
            missing = sorted(set(ref_grads) ^ set(grads))
            gdiff = max(((grads[n] - g).abs().max().item() for n, g in ref_grads.items()
                         if g is not None and grads.get(n) is not None), default=0.0)
            none_mismatch = [n for n, g in ref_grads.items() if (g is None) != (grads.get(n) is None)]
            out[(name, sp)] = {
                "loss": abs(loss.item() - ref_loss.item()),
                "output": (case.output(got) - case.output(ref_out)).abs().max().item(),
                "grad": gdiff, "missing": missing, "none_mismatch": none_mismatch,
                "scale": max(g.abs().max().item() for g in ref_grads.values() if g is not None),
            }
    return out


def properties(rank: int, world: int) -> dict:
    """Sharding, collectives, replicated-gradient agreement, state-dict round trip, no mutation."""
    case, model, args, kwargs = build("gpt2", world)
    before = copy.deepcopy(model.state_dict())
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    training = model.training
    pm = autoseqpar.transform(model, (args, kwargs), tp=world)
    res: dict = {}
    full = dict(model.named_parameters())
    ratios = {}
    for name, p in pm.module.named_parameters():
        if name in pm._shards:
            ratios[name] = p.numel() / full[name].numel()
    res["shard_ratios"] = ratios
    res["plan"] = pm.plan
    kinds = {}
    for n in pm.graph.graph.nodes:
        k = n.meta.get("autoseqpar", {}).get("kind")
        if n.op == "call_function" and k:
            spec = n.meta["autoseqpar"].get("spec")
            kinds.setdefault(k, []).append(None if spec is None else (spec.dim, spec.blocks, spec.kind))
    res["collectives"] = kinds
    case.loss(pm(*args, **kwargs)).backward()
    ln = {n: p.grad.clone() for n, p in pm.module.named_parameters() if ".ln_" in n}
    gathered = {}
    for n, g in ln.items():
        parts = [torch.empty_like(g) for _ in range(world)]
        dist.all_gather(parts, g)
        gathered[n] = all(torch.equal(parts[0], q) for q in parts)
    res["ln_grads_identical"] = gathered
    sd = pm.gather_state_dict()
    fresh = type(model)(model.config)
    fresh.load_state_dict(sd)
    res["roundtrip_exact"] = all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    res["keys_equal"] = list(sd) == list(before)
    after = model.state_dict()
    res["unchanged"] = (all(torch.equal(before[k], after[k]) for k in before)
                        and {n: p.requires_grad for n, p in model.named_parameters()} == requires
                        and model.training == training
                        and all(p.grad is None for p in model.parameters()))
    out_orig = model(*args, **kwargs).loss
    res["orig_still_runs"] = bool(torch.isfinite(out_orig))
    # clip_grad_norm_: the global norm equals the unsharded model's
    model.zero_grad()
    case.loss(model(*args, **kwargs)).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item()
    res["clip_norm"] = (pm.clip_grad_norm_(1e9).item(), ref_norm)
    return res


def dropout_streams(rank: int, world: int) -> dict:
    """With dropout on: sharded masks differ across ranks, replicated ones agree, and the same
    seed repeats the same losses."""
    from models import NanoGPT
    from passes.rng import dropout_mask
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        pm = autoseqpar.transform(NanoGPT(dropout=0.5), ((ids, ids), {}), seed=123)
        losses.append([pm(ids, ids)[1].item() for _ in range(2)])
    streams = []
    for n in pm.graph.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.autoseqpar.dropout_mask.default:
            streams.append(n.args[2].args[2])  # select(seeds, 0, i): 0 per-rank, 1 group-wide
    seeds = pm.dropout_seeds()
    x = torch.ones(4, 16)
    out = {}
    for i, name in ((0, "per_rank"), (1, "group")):
        mask = dropout_mask(x, 0.5, seeds[i], 7)
        parts = [torch.empty_like(mask) for _ in range(world)]
        dist.all_gather(parts, mask)
        out[name + "_equal"] = all(torch.equal(parts[0], q) for q in parts)
    return {"losses": losses, "streams": streams, **out}
