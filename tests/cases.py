"""Named test cases: a model factory, its example inputs and how to read a scalar loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from models import NanoGPT, NoPositionGPT, ParallelBlockGPT, hf_bert, hf_gpt2, hf_llama

BATCH, SEQ, VOCAB = 2, 8, 64


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable  # (t) -> model
    inputs: Callable  # (ids) -> (args, kwargs)
    loss: Callable  # (output) -> scalar tensor
    output: Callable  # (output) -> the main output tensor


def _ids(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _bert_loss(o):
    return (o.last_hidden_state ** 2).mean() + o.pooler_output.sum()


def _llama(t):
    # GQA: half as many KV heads as query heads, and at least t of them
    kv = max(2, t)
    return hf_llama(hidden=16 * kv, heads=2 * kv, kv_heads=kv)


CASES = {
    "nanogpt": Case("nanogpt", lambda t: NanoGPT(), lambda ids: ((ids, ids.roll(-1, 1)), {}),
                    lambda o: o[1], lambda o: o[0]),
    "no_position": Case("no_position", lambda t: NoPositionGPT(),
                        lambda ids: ((ids, ids.roll(-1, 1)), {}), lambda o: o[1], lambda o: o[0]),
    "parallel_block": Case("parallel_block", lambda t: ParallelBlockGPT(),
                           lambda ids: ((ids, ids.roll(-1, 1)), {}), lambda o: o, lambda o: o),
    "gpt2": Case("gpt2", lambda t: hf_gpt2(), lambda ids: ((ids,), {"labels": ids.clone()}),
                 lambda o: o.loss, lambda o: o.logits),
    "llama": Case("llama", _llama, lambda ids: ((ids,), {"labels": ids.clone()}),
                  lambda o: o.loss, lambda o: o.logits),
    "bert": Case("bert", lambda t: hf_bert(), lambda ids: ((ids,), {}), _bert_loss,
                 lambda o: o.last_hidden_state),
}


def build(name: str, t: int, seed: int = 0):
    torch.manual_seed(seed)
    case = CASES[name]
    model = case.build(t)
    args, kwargs = case.inputs(_ids())
    return case, model, args, kwargs
