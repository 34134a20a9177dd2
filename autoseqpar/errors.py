"""autoseqpar's own exceptions. Each message names the cause and what to do about it."""
from __future__ import annotations


class AutoSeqParError(Exception):
    """Base class of every error autoseqpar raises on purpose."""


class ProcessGroupError(AutoSeqParError):
    """No initialized process group, or its size differs from the requested ``tp``."""


class DivisibilityError(AutoSeqParError):
    """A dimension (sequence length, heads, KV heads, hidden) does not split over ``tp`` ranks."""


class CaptureError(AutoSeqParError):
    """The model could not be traced into an aten graph; the tracer's error is the ``__cause__``."""


class NoParallelStructureError(AutoSeqParError):
    """No column/row-parallel linear pair was found; the message lists what was found instead."""


class InputMismatchError(AutoSeqParError):
    """A call's inputs differ in structure, shape or dtype from those the module was built for."""


class UnsupportedModelError(AutoSeqParError):
    """The model does something autoseqpar cannot parallelise (e.g. mutates a buffer in forward)."""


class PassError(AutoSeqParError):
    """A graph pass failed; the message says which, after which, and the cause is attached."""


class ConfigError(AutoSeqParError, TypeError):
    """An unknown or invalid option."""


class MemoryBudgetError(AutoSeqParError):
    """``memory_budget`` is below what the most aggressive recompute plan still saves."""

    def __init__(self, message: str, minimum: int):
        super().__init__(message)
        self.minimum = minimum
