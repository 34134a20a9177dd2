"""explain(): transform's decisions in one process without a process group; the Report; the
CLI; the annotated graph; pass logging."""
import json
import logging
import os
import resource
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import autoseqpar
from cases import build
from distributed import run_ranks
from models import NanoGPT
import workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _llama7b(layers=32):
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers)).to(torch.bfloat16)


@pytest.mark.timeout(300)
def test_explain_llama7b_at_t8_in_one_process_under_a_minute():
    assert not dist.is_initialized()
    model = _llama7b()
    ids = torch.zeros(1, 2048, dtype=torch.long, device="meta")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = autoseqpar.explain(model, ((ids,), {"labels": ids}), tp=8, hardware="h100")
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024
    assert seconds < 60, seconds
    assert grown < 4 * 2**30, grown  # 6.7 B bf16 parameters would be 12.5 GiB
    assert not dist.is_initialized()  # nothing left behind
    layers = [r for r in report.layers if r["layer"].startswith("model.layers.")]
    assert len(layers) == 32
    # the matmul weights are split 8 ways; embeddings, LM head and norms stay whole
    full = sum(p.numel() for p in model.parameters())
    replicated = 2 * 32000 * 4096 + 65 * 4096
    assert report.totals["parameters_per_rank"] == (full - replicated) // 8 + replicated
    assert report.not_sequence_parallel == []  # every RMSNorm runs on sequence shards
    s, h, t = 2048, 4096, 8
    for r in layers:  # SP + flash attention + SwiGLU: bounded by the paper's no-recompute
        assert 0 < r["total"] <= 114 * s * h / t
    assert "model.layers.31" in str(report)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", [2, 4])
def test_explain_bytes_equal_transform_measured(world):
    names = ["gpt2", "llama"]
    measured = run_ranks(workers.report_rows, world, names, timeout=800)[0]
    for name in names:
        case, model, args, kwargs = build(name, world)
        report = autoseqpar.explain(model, (args, kwargs), tp=world, hardware="cpu")
        got = report.to_dict()
        assert got["layers"] == measured[name]["layers"], name
        assert got["totals"]["saved_activation_bytes"] == \
            measured[name]["totals"]["saved_activation_bytes"], name
        assert got["collectives"] == measured[name]["collectives"], name
        assert got["plan"] == measured[name]["plan"], name


@pytest.fixture(scope="module")
def gpt2_report():
    case, model, args, kwargs = build("gpt2", 2)
    return autoseqpar.explain(model, (args, kwargs), tp=2, hardware="h100")


def test_report_tables(gpt2_report):
    text = str(gpt2_report)
    for heading in ("Saved activations per layer", "Collectives per step", "totals",
                    "Recompute decisions", "op-count diff", "paper (none / selective)",
                    "(estimate)"):
        assert heading in text, heading
    kinds = {(c["direction"], c["kind"]) for c in gpt2_report.collectives}
    assert ("forward", "all_gather_into_tensor") in kinds
    assert ("backward", "reduce_scatter_tensor") in kinds
    assert sum(r["total"] for r in gpt2_report.layers) == \
        gpt2_report.totals["saved_activation_bytes"]


def test_saved_activations_in_user_terms(gpt2_report):
    saved = gpt2_report.saved_activations()
    assert [a.bytes for a in saved] == sorted((a.bytes for a in saved), reverse=True)
    big = [a for a in saved if a.bytes]
    assert big and all(a.module and a.source and a.op for a in big), big
    assert any(a.module.startswith("transformer.h.0.") for a in big)
    assert any(".py:" in a.source for a in big)
    assert {a.category for a in big} <= {"attention", "mlp", "norms", "masks", "other"}


def test_to_dict_is_json(gpt2_report):
    d = json.loads(json.dumps(gpt2_report.to_dict()))
    assert d["header"]["tp"] == 2 and d["header"]["explained"] is True
    assert len(d["saved_activations"]) == len(gpt2_report.saved)


def test_pareto_curve_trades_memory_for_recompute(gpt2_report, tmp_path):
    points = gpt2_report.pareto(5)
    curve = [p for p in points if "policy" not in p]
    named = {p["policy"]: p for p in points if "policy" in p}
    assert len(curve) == 5
    for p in curve:
        assert p["saved_bytes"] <= max(p["budget"], curve[0]["saved_bytes"])
    assert curve[-1]["recompute_time_estimate_s"] <= curve[0]["recompute_time_estimate_s"]
    assert named["full"]["saved_bytes"] < named["paper"]["saved_bytes"] \
        <= named["none"]["saved_bytes"]
    pytest.importorskip("matplotlib")
    path = gpt2_report.plot(str(tmp_path / "pareto.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


class TokenMixingNorm(NanoGPT):
    """A LayerNorm across the sequence (MLP-Mixer style) gating the embeddings: it cannot run
    on sequence shards; everything else can."""

    def forward(self, idx, targets=None):
        x = self.wte(idx)
        mixed = F.layer_norm(x.transpose(1, 2), (x.shape[1],))  # normalized over the tokens
        x = x + mixed.mean(1).unsqueeze(-1)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def test_report_says_which_norm_stays_replicated_and_why():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8))
    report = autoseqpar.explain(TokenMixingNorm(), ((ids, ids), {}), tp=2, hardware="cpu")
    left = report.not_sequence_parallel
    assert len(left) == 1 and "mixes tokens" in left[0]["reason"], left
    assert report.plan["h.0.ln_1"] == "sequence" and report.plan["ln_f"] == "sequence"
    assert "kept replicated (not sequence-parallel)" in str(report)


def test_annotated_graph_shows_layouts_and_recompute(fake_group):
    fake_group(2)
    case, model, args, kwargs = build("nanogpt", 2)
    pm = autoseqpar.transform(model, (args, kwargs), recompute="paper")
    text = str(pm.graph)
    for note in ("# colwise", "rowwise", "all_gather seq", "reduce_scatter seq", "# save ",
                 "recompute"):
        assert note in text, note


def test_passes_log_their_op_count_diff(fake_group, caplog):
    fake_group(2)
    case, model, args, kwargs = build("nanogpt", 2)
    with caplog.at_level(logging.INFO, logger="autoseqpar.passes"):
        autoseqpar.transform(model, (args, kwargs))
    lines = [r.getMessage() for r in caplog.records if r.name == "autoseqpar.passes"]
    assert len(lines) == 9
    assert any("insert_sequence_parallel_collectives_pass" in x and "all_gather_seq +" in x
               for x in lines)


@pytest.mark.timeout(300)
def test_cli_explains_a_config_file(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
           "vocab_size": 128}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "autoseqpar", "explain", str(path), "--tp", "2",
                          "--seq", "64", "--json", str(tmp_path / "r.json")],
                         env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LlamaForCausalLM" in out.stdout and "model.layers.1" in out.stdout
    assert "Saved activations per layer" in out.stdout
    assert json.loads((tmp_path / "r.json").read_text())["header"]["tp"] == 2
    bad = subprocess.run([sys.executable, "-m", "autoseqpar", "explain", str(path), "--tp", "3",
                          "--seq", "64"], env=env, capture_output=True, text=True, timeout=280)
    assert bad.returncode == 2 and "DivisibilityError" in bad.stderr


@pytest.mark.parametrize("name", ["gpt2", "nanogpt"])
def test_partitioned_graphs_run_no_dead_work(fake_group, name):
    """Every op of the forward and backward graphs reaches their outputs: no forward chain
    behind an unused collective's wait is re-run in backward."""
    fake_group(2)
    case, model, args, kwargs = build(name, 2)
    part = autoseqpar.transform(model, (args, kwargs)).partitions[-1]
    for gm in (part.fw, part.bw):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        live, stack = set(), [out]
        while stack:
            n = stack.pop()
            if n not in live:
                live.add(n)
                stack.extend(n.all_input_nodes)
        dead = [n.name for n in gm.graph.nodes if n.op == "call_function" and n not in live]
        assert not dead, dead


def test_explain_beside_an_initialized_process_group(fake_group):
    """Inside a torchrun job (a default group of another size exists) explain still plays its
    own tp ranks, and leaves the user's group as it was."""
    world = fake_group(2)
    case, model, args, kwargs = build("gpt2", 4)
    report = autoseqpar.explain(model, (args, kwargs), tp=4, hardware="cpu")
    assert report.header["tp"] == 4
    assert dist.is_initialized() and dist.get_world_size(world) == 2
