"""``python -m autoseqpar explain``: what autoseqpar would do to a HuggingFace model at a given t.

    python -m autoseqpar explain llama --tp 8 --seq 2048 --batch 1
    python -m autoseqpar explain path/to/config.json --tp 4 --hardware a100 --set num_hidden_layers=4

The model is built from its config on the meta device (no weights, no memory: a model type's
default config, e.g. ``llama``, is the 7B shape) and explained in this one process.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from .errors import AutoSeqParError, ConfigError


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def load_config(spec: str, overrides: list):
    """A transformers config from a model type (``llama``, ``gpt2``...) or a config.json."""
    from transformers import AutoConfig
    sets = {}
    for item in overrides:
        key, sep, val = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: write key=value")
        sets[key] = _value(val)
    if os.path.exists(spec):
        path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
        with open(path) as f:
            data = json.load(f)
        if "model_type" not in data:
            raise ConfigError(f"{path} has no model_type")
        return AutoConfig.for_model(data.pop("model_type"), **{**data, **sets})
    try:
        return AutoConfig.for_model(spec, **sets)
    except ValueError as e:
        raise ConfigError(f"{spec!r} is neither a file nor a HuggingFace model type: {e}") from e


def build_model(config, dtype: torch.dtype):
    """The model of ``config`` on the meta device: a causal LM when the type has one."""
    from transformers import AutoModel, AutoModelForCausalLM
    with torch.device("meta"):
        try:
            model, causal = AutoModelForCausalLM.from_config(config), True
        except ValueError:
            model, causal = AutoModel.from_config(config), False
    return model.to(dtype), causal


def explain_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autoseqpar explain",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a HuggingFace model type (llama, gpt2, mistral...) or a "
                                  "config.json (or a folder holding one)")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hardware", default="h100", help="a100 | h100 | h200 | cpu")
    ap.add_argument("--dtype", default="bfloat16", help="parameter and activation dtype")
    ap.add_argument("--recompute", default="auto", help="auto | none | paper | full")
    ap.add_argument("--memory-budget", type=float, default=None,
                    help="saved activation bytes per rank, or a fraction in (0, 1]")
    ap.add_argument("--no-sequence-parallel", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (repeatable)")
    ap.add_argument("--json", help="also write report.to_dict() here")
    ap.add_argument("--plot", help="also draw the memory/recompute Pareto curve here (png)")
    ap.add_argument("--log-passes", action="store_true", help="log each pass's op-count diff")
    a = ap.parse_args(argv)
    if a.log_passes:
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("autoseqpar.passes").setLevel(logging.INFO)
    from . import explain
    try:
        dtype = getattr(torch, a.dtype)
        config = load_config(a.model, a.set)
        model, causal = build_model(config, dtype)
        ids = torch.zeros(a.batch, a.seq, dtype=torch.long, device="meta")
        inputs = ((ids,), {"labels": ids}) if causal else ((ids,), {})
        budget = a.memory_budget
        if budget is not None and budget > 1:
            budget = int(budget)
        start = time.perf_counter()
        report = explain(model, inputs, tp=a.tp, hardware=a.hardware,
                         sequence_parallel=not a.no_sequence_parallel, recompute=a.recompute,
                         memory_budget=budget)
        seconds = time.perf_counter() - start
    except (AutoSeqParError, ValueError) as e:
        print(f"autoseqpar explain: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__} from {a.model}: {n_params:,} parameters, "
          f"{a.dtype}; batch {a.batch} x seq {a.seq}; explained in {seconds:.1f} s (measured) "
          "in one process, no process group\n")
    print(report)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
        print(f"\nwrote {a.json}")
    if a.plot:
        print(f"wrote {report.plot(a.plot)}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "explain":
        print("usage: python -m autoseqpar explain <hf-model-type-or-config.json> [--tp 8] "
              "[--seq 2048] [--batch 1] [--hardware h100] ...  (explain --help for all)",
              file=sys.stderr)
        return 2
    return explain_main(argv[1:])
