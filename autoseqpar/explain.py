"""``explain``: what ``transform`` would do at a given t, in one process, on fake tensors.

    report = autoseqpar.explain(model, example_inputs, tp=8, hardware="h100")
    print(report)

A fake process group of ``tp`` ranks is registered by name for the call only (no default group
is created or needed), the parameters are sharded as FakeTensors and the joint graph is
traced and partitioned on them: a config of billions of parameters costs no memory (a model
built on the meta device is run as fake CPU tensors, so its kernel choices are a real run's).
Everything ``transform`` decides -- plan, collectives, saved activations, recompute -- is the
same code on the same shapes, so the byte figures are exact; times are cost-model estimates.
"""
from __future__ import annotations

import torch

from passes._compat import FakeGroup

from .api import build
from .config import Options
from .errors import ConfigError


def explain(model: torch.nn.Module, example_inputs, *, tp: int = 8, hardware="h100",
            sequence_parallel: bool = True, rank: int = 0, **options):
    """The :class:`autoseqpar.report.Report` of ``transform(model, example_inputs, tp=tp)``
    on ``hardware``, without a process group. ``model`` may live on the meta device;
    ``example_inputs`` only need their shapes and dtypes (meta tensors are fine)."""
    from .report import Report

    if not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"tp={tp!r}: give the tensor-parallel degree, an integer >= 1")
    opts = Options.make(sequence_parallel=sequence_parallel, hardware=hardware, **options)
    fake_group = FakeGroup(tp, rank)
    with fake_group as group:
        pm = build(model, example_inputs, tp, group, opts, fake=True)
        # the report re-enters the fake group to re-solve (report.pareto / plot)
        return Report.of(pm, explained=True, context=fake_group)
