"""The one options dataclass, frozen, passed keyword-only through the pipeline."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError


@dataclass(frozen=True)
class Options:
    """What ``transform`` does beyond the TP degree and group.

    sequence_parallel: Megatron sequence parallelism (reduce-scatter / all-gather around the
        sequence-local regions). False gives plain Megatron TP with all-reduces.
    seq_dim: the token dimension of the model's ``(batch, seq)`` inputs.
    seed: base seed of the per-rank dropout streams (rank ``r`` uses a stream derived from
        ``seed`` and ``r``); None takes ``torch.initial_seed()`` at transform time.
    """

    sequence_parallel: bool = True
    seq_dim: int = 1
    seed: Optional[int] = None

    @classmethod
    def make(cls, **kwargs) -> "Options":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; valid options are {sorted(names)}")
        return cls(**kwargs)
