"""The one options dataclass, frozen, passed keyword-only through the pipeline."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

from .errors import ConfigError


@dataclass(frozen=True)
class Options:
    """What ``transform`` does beyond the TP degree and group.

    sequence_parallel: Megatron sequence parallelism (reduce-scatter / all-gather around the
        sequence-local regions). False gives plain Megatron TP with all-reduces.
    seq_dim: the token dimension of the model's ``(batch, seq)`` inputs.
    seed: base seed of the dropout streams (rank ``r``'s stream derives from ``seed``, ``r``
        and the step); None takes ``torch.initial_seed()`` at transform time.
    recompute: ``"auto"`` (least activation memory within ``max_overhead`` of the estimated
        step time), ``"none"``, ``"paper"`` (Megatron's selective recompute: the attention
        core), ``"full"`` (each layer from its input).
    memory_budget: saved activation bytes per rank (int), or a fraction in (0, 1] of the
        no-recompute plan's; the least recompute within it. Overrides ``recompute``.
    max_overhead: the recompute allowance of ``"auto"``, a fraction of the step.
    compiler: how the partitioned forward and backward graphs run: ``"eager"`` (the fx graphs
        as they are), ``"inductor"`` (generated kernels; on CPU it needs a C++ compiler), or a
        callable ``(gm, example_inputs) -> callable``.
    hardware: the cost model's profile: ``"a100"``, ``"h100"``, ``"h200"``, ``"cpu"``, a
        :class:`autoseqpar.cost_model.Hardware`, or None (``"h100"`` on CUDA, else ``"cpu"``).
    """

    sequence_parallel: bool = True
    seq_dim: int = 1
    seed: Optional[int] = None
    recompute: str = "auto"
    memory_budget: Optional[Union[int, float]] = None
    max_overhead: float = 0.03
    hardware: object = None
    compiler: object = "eager"

    @classmethod
    def make(cls, **kwargs) -> "Options":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; valid options are {sorted(names)}")
        out = cls(**kwargs)
        from .backend import check_inner
        check_inner(out.compiler)
        return out
