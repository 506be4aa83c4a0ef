"""sdft_kernels: fused distillation losses and streaming CKA kernels for studying and repairing
degraded LLMs with self-distillation fine-tuning (SDFT).

Importing the package loads the compiled extension `sdft_kernels._C`, which registers the ops under
`torch.ops.sdft_kernels`.
"""
import torch  # noqa: F401  (must be imported before the extension)

from . import _C  # noqa: F401  registers torch.ops.sdft_kernels.*

__version__ = "0.1.0"

# Public API, one import line per family (each family's module re-exports its typed wrappers).
from .cka import LinearCKA, MinibatchCKA, kernel_cka, kernel_hsic  # noqa: E402,F401  (streaming CKA)
from . import degrade, evaluate, tasks  # noqa: E402,F401  (degradation, evaluation, the narrow task)
from .ops.distill import distill_loss, distill_loss_topk  # noqa: E402,F401  (fused distillation)
from .ops.fused_linear import fused_linear_distill_loss  # noqa: E402,F401
from .losses import DistillationLoss  # noqa: E402,F401
