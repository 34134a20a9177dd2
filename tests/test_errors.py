"""Invariant 3: bad input gets a clear error of autoseqpar's own types, naming the cause."""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import autoseqpar
from cases import build
from models import NanoGPT, hf_llama


def _ids(s=8):
    return torch.randint(0, 64, (2, s), generator=torch.Generator().manual_seed(0))


def test_no_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()
    with pytest.raises(autoseqpar.ProcessGroupError, match="init_process_group"):
        autoseqpar.transform(NanoGPT(), (_ids(),))


def test_world_size_differs_from_tp(fake_group):
    fake_group(2)
    with pytest.raises(autoseqpar.ProcessGroupError, match="tp=4 but the process group has 2"):
        autoseqpar.transform(NanoGPT(), (_ids(),), tp=4)


def test_sequence_not_divisible(fake_group):
    fake_group(4)
    with pytest.raises(autoseqpar.DivisibilityError, match="sequence length 6 .* not divisible by tp=4"):
        autoseqpar.transform(NanoGPT(), (_ids(6),))


def test_heads_not_divisible(fake_group):
    fake_group(4)
    model = NanoGPT(n_head=2, n_embd=32)  # 2 heads over 4 ranks
    with pytest.raises(autoseqpar.DivisibilityError, match="heads"):
        autoseqpar.transform(model, (_ids(),))


def test_kv_heads_not_divisible(fake_group):
    fake_group(4)
    model = hf_llama(hidden=32, heads=4, kv_heads=2)  # GQA: 2 KV heads over 4 ranks
    with pytest.raises(autoseqpar.DivisibilityError, match=r"k_proj|v_proj"):
        autoseqpar.transform(model, ((_ids(),), {"labels": _ids()}))


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor's value: not traceable with static shapes
            return self.lin(x)
        return x


def test_untraceable_model(fake_group):
    fake_group(2)
    with pytest.raises(autoseqpar.CaptureError, match="torch.export could not trace") as info:
        autoseqpar.transform(_DataDependent(), (torch.randn(2, 4, 8),))
    assert info.value.__cause__ is not None  # the tracer's own error is attached


class _NoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, ids):
        return self.norm(self.emb(ids)).sum()


def test_no_tensor_parallel_structure(fake_group):
    fake_group(2)
    with pytest.raises(autoseqpar.NoParallelStructureError, match="no column/row-parallel"):
        autoseqpar.transform(_NoLinears(), (_ids(),))


def test_call_with_other_shape(fake_group):
    fake_group(2)
    case, model, args, kwargs = build("gpt2", 2)
    pm = autoseqpar.transform(model, (args, kwargs))
    with pytest.raises(autoseqpar.InputMismatchError, match=r"built for \(2, 8\)"):
        pm(_ids(16), labels=_ids(16))
    with pytest.raises(autoseqpar.InputMismatchError, match="keyword"):
        pm(*args)  # labels missing


def test_mode_switch_is_refused(fake_group):
    fake_group(2)
    case, model, args, kwargs = build("nanogpt", 2)
    pm = autoseqpar.transform(model, (args, kwargs))
    with pytest.raises(autoseqpar.InputMismatchError, match="captured in training mode"):
        pm.eval()


def test_unknown_option(fake_group):
    fake_group(2)
    with pytest.raises(autoseqpar.ConfigError, match="unknown option"):
        autoseqpar.transform(NanoGPT(), (_ids(),), recompute_everything=True)


def test_errors_share_a_base():
    for cls in (autoseqpar.ProcessGroupError, autoseqpar.DivisibilityError,
                autoseqpar.CaptureError, autoseqpar.NoParallelStructureError,
                autoseqpar.InputMismatchError, autoseqpar.PassError, autoseqpar.ConfigError):
        assert issubclass(cls, autoseqpar.AutoSeqParError)
