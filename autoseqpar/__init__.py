"""autoseqpar: Megatron tensor + sequence parallelism for unmodified PyTorch transformers, by
compiler passes over torch.fx graphs.

    pmodel = autoseqpar.transform(model, example_inputs, tp=dist.get_world_size())
"""
from .api import transform
from .config import Options
from .errors import (AutoSeqParError, CaptureError, ConfigError, DivisibilityError,
                     InputMismatchError, MemoryBudgetError, NoParallelStructureError, PassError, ProcessGroupError,
                     UnsupportedModelError)
from .runtime import ParallelModule

__version__ = "0.1.0"
__all__ = ["transform", "Options", "ParallelModule", "AutoSeqParError", "CaptureError",
           "ConfigError", "DivisibilityError", "InputMismatchError", "MemoryBudgetError", "NoParallelStructureError",
           "PassError", "ProcessGroupError", "UnsupportedModelError"]
