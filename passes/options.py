"""Options every pass takes (keyword-only, frozen): what the graph is being parallelised for."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PassOptions:
    tp: int  # tensor-parallel degree t
    group_name: str  # the process group's name, resolved by the functional collectives
    sequence_parallel: bool = True  # Megatron SP (True) or plain TP with all-reduces (False)
    seq_dim: int = 1  # the token dimension of the model's (batch, seq) inputs
