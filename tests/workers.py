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


def _reference(name: str, world: int):
    """A case built fresh, its unmodified loss and gradients (the model's grads zeroed after)."""
    case, model, args, kwargs = build(name, world)
    ref_loss = case.loss(model(*args, **kwargs))
    ref_loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad()
    return case, model, args, kwargs, ref_loss, ref


def _against(loss, ref_loss, pm, ref: dict) -> dict:
    """Loss and largest gathered-gradient difference against the reference, and its scale."""
    grads = pm.gather_grads()
    return {"loss": abs(loss.item() - ref_loss.item()),
            "grad": max((grads[n] - g).abs().max().item() for n, g in ref.items()
                        if g is not None),
            "scale": max(g.abs().max().item() for g in ref.values() if g is not None)}


def recompute_parity(rank: int, world: int, names: list, options: list) -> dict:
    """Gradients with every recompute option equal the unmodified model's (dropout 0)."""
    out = {}
    for name in names:
        for opt in options:
            case, model, args, kwargs, ref_loss, ref = _reference(name, world)
            pm = autoseqpar.transform(model, (args, kwargs), **opt)
            loss = case.loss(pm(*args, **kwargs))
            loss.backward()
            out[(name, str(opt))] = {**_against(loss, ref_loss, pm, ref),
                                     "saved": pm.partitions[-1].saved_bytes}
    return out


def dropout_recompute(rank: int, world: int) -> dict:
    """Dropout 0.1, one seed: the default plan's gradients equal recompute="none"'s (the masks
    rebuilt in backward are the forward's), and a budgeted plan's too."""
    from models import NanoGPT
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    grads = {}
    recomputed_masks = {}
    for opt in ({"recompute": "none"}, {"recompute": "auto"}, {"memory_budget": 0.3},
                {"recompute": "full"}):
        torch.manual_seed(0)
        model = NanoGPT(block_size=16, dropout=0.1)
        pm = autoseqpar.transform(model, ((ids, ids), {}), seed=7, **opt)
        pm(ids, ids)[1].backward()
        grads[str(opt)] = pm.gather_grads()
        rec = pm.partitions[-1]
        recomputed_masks[str(opt)] = sum(
            1 for n in rec.plan.recomputed
            if n.target is torch.ops.autoseqpar.dropout_mask.default)
    base = grads[str({"recompute": "none"})]
    diffs = {k: max((g[n] - base[n]).abs().max().item() for n in base) for k, g in grads.items()}
    return {"diffs": diffs, "recomputed_masks": recomputed_masks}


def activation_bytes(rank: int, world: int, sizes: tuple, modes: list, step: bool = True) -> dict:
    """Saved activation bytes per layer per rank for each (sequence_parallel, recompute), from
    the partitioned graph and, independently, from autograd's saved-tensor hooks on a real step."""
    from models import NanoGPT
    s, b, h, a, L = sizes
    ids = torch.randint(0, 128, (b, s), generator=torch.Generator().manual_seed(0))
    out = {}
    for sp, rec in modes:
        torch.manual_seed(0)
        model = NanoGPT(vocab_size=128, block_size=s, n_layer=L, n_head=a, n_embd=h,
                        dropout=0.1).to(torch.bfloat16)
        pm = autoseqpar.transform(model, ((ids, ids), {}), sequence_parallel=sp, recompute=rec)
        part = pm.partitions[-1]
        per_layer: dict = {}
        for _, _, _, nbytes, layer, _ in part.saved:
            per_layer[layer] = per_layer.get(layer, 0) + nbytes
        hooked = _hooked_saved_bytes(pm, ids) if step else None
        totals = _step_totals(pm, part)
        out[(sp, rec)] = {"per_layer": per_layer, "graph_total": part.saved_bytes,
                          "hooked_total": hooked,
                          "flops_frac": part.plan.recompute_flops / max(1, totals.step_flops),
                          "time_frac": part.plan.recompute_time / totals.step_time}
    return out


def _step_totals(pm, part):
    """The whole step's FLOPs (exact) and estimated time on the module's hardware profile."""
    from autoseqpar.solver import CostCache, classify, step_totals
    return step_totals(classify(part.joint, part.num_fwd_outputs), CostCache(pm.hardware))


def _hooked_saved_bytes(pm, ids) -> int:
    """Bytes of the distinct storages autograd keeps for backward, not counting parameters,
    buffers or the inputs: what the forward adds to memory until backward."""
    skip = {t.untyped_storage().data_ptr() for t in [*pm.parameters(), *pm.buffers(), ids]}
    seen: dict = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pm(ids, ids)[1]
    loss.backward()
    return sum(seen.values())


def fused_attention_dropout(rank: int, world: int) -> dict:
    """HF GPT-2 with attention dropout (inside the fused SDPA kernel, drawn from the global
    RNG): the kernel is never recomputed, so every option keeps "none"'s gradients."""
    from models import hf_gpt2
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    grads = {}
    for opt in ({"recompute": "none"}, {"recompute": "full"}, {"memory_budget": 0.2}):
        torch.manual_seed(0)
        model = hf_gpt2(dropout=0.1)
        pm = autoseqpar.transform(model, ((ids,), {"labels": ids}), seed=7, **opt)
        torch.manual_seed(11)
        pm(ids, labels=ids).loss.backward()
        grads[str(opt)] = pm.gather_grads()
    base = grads[str({"recompute": "none"})]
    return {k: max((g[n] - base[n]).abs().max().item() for n in base) for k, g in grads.items()}


def _collectives_in(gm) -> int:
    from autoseqpar.cost_model import is_collective
    return sum(1 for n in gm.graph.nodes if is_collective(n))


def compiled_parity(rank: int, world: int, names: list, runs: list) -> dict:
    """torch.compile(transform(model), backend=autoseqpar.backend(inner=...)) and
    transform(model, compiler=...): loss and gathered gradients against the unmodified model;
    the compiled partition's collectives."""
    out = {}
    for name in names:
        for how, inner in runs:
            case, model, args, kwargs, ref_loss, ref = _reference(name, world)
            torch._dynamo.reset()
            if how == "backend":
                pm = autoseqpar.transform(model, (args, kwargs))
                be = autoseqpar.backend(inner=inner)
                runner = torch.compile(pm, backend=be)
                records = be.partitions
            else:
                pm = runner = autoseqpar.transform(model, (args, kwargs), compiler=inner)
                records = pm.partitions
            loss = case.loss(runner(*args, **kwargs))
            loss.backward()
            out[(name, how, inner)] = {
                **_against(loss, ref_loss, pm, ref), "partitions": len(records),
                "collectives": (_collectives_in(records[-1].fw), _collectives_in(records[-1].bw)),
            }
    return out


def compiled_dropout(rank: int, world: int) -> dict:
    """Dropout 0.1 under torch.compile of a ParallelModule, one seed: a memory budget (masks
    rebuilt in backward) gives the gradients of recompute="none"."""
    from models import NanoGPT
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    grads, saved = {}, {}
    for opt in ({"recompute": "none"}, {"memory_budget": 0.3}):
        torch.manual_seed(0)
        pm = autoseqpar.transform(NanoGPT(block_size=16, dropout=0.1), ((ids, ids), {}), seed=7)
        torch._dynamo.reset()
        be = autoseqpar.backend(**opt)
        torch.compile(pm, backend=be)(ids, ids)[1].backward()
        grads[str(opt)] = pm.gather_grads()
        saved[str(opt)] = be.partitions[-1].saved_bytes
    base = grads[str({"recompute": "none"})]
    budget = grads[str({"memory_budget": 0.3})]
    return {"diff": max((budget[n] - base[n]).abs().max().item() for n in base), "saved": saved}


def report_rows(rank: int, world: int, names: list) -> dict:
    """The report of transform on real ranks (CPU profile): per-layer bytes, totals, plan."""
    out = {}
    for name in names:
        case, model, args, kwargs = build(name, world)
        d = autoseqpar.transform(model, (args, kwargs)).report().to_dict()
        out[name] = {k: d[k] for k in ("layers", "totals", "collectives", "plan")}
    return out
