"""autoseqpar: Megatron tensor + sequence parallelism for unmodified PyTorch transformers, by
compiler passes over torch.fx graphs.

    pmodel = autoseqpar.transform(model, example_inputs, tp=dist.get_world_size())
    report = autoseqpar.explain(model, example_inputs, tp=8, hardware="h100")   # no cluster
"""
from passes._compat import MIN_TORCH, torch_version

if torch_version() < MIN_TORCH:
    raise ImportError(f"autoseqpar needs torch >= {'.'.join(map(str, MIN_TORCH))}")

from .api import transform  # noqa: E402
from .explain import explain  # noqa: E402
from .backend import backend  # noqa: E402
from .config import Options  # noqa: E402
from .errors import (AutoSeqParError, CaptureError, ConfigError,  # noqa: E402
                     DivisibilityError, InputMismatchError, MemoryBudgetError,
                     NoParallelStructureError, PassError, ProcessGroupError,
                     UnsupportedModelError)
from .report import Report  # noqa: E402
from .runtime import ParallelModule  # noqa: E402

__version__ = "0.1.0"
__all__ = ["transform", "explain", "backend", "Options", "ParallelModule", "Report",
           "AutoSeqParError", "CaptureError",
           "ConfigError", "DivisibilityError", "InputMismatchError", "MemoryBudgetError",
           "NoParallelStructureError", "PassError", "ProcessGroupError", "UnsupportedModelError"]
