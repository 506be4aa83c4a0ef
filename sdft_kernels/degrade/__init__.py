"""Degradations of a causal LM. Each function deep-copies the model and returns (new_model, record);
the record is JSON-able and always has "kind", "params" and "layer_map" (student decoder-layer index
-> teacher decoder-layer index).

- quantize.quantize_rtn / quantize.quantize_gptq: weight-only group-wise quantization (QuantLinear)
- prune.prune_blocks / prune.prune_unstructured / prune.prune_2_4: block removal and weight sparsity
- forget.forget_sft: catastrophic forgetting by SFT on the shipped narrow task (tasks.py)
"""
from . import quantize  # noqa: F401  (first: gptq.py builds on quantize.py's grid)
from . import gptq  # noqa: F401
from .quantize import QuantLinear, quantize_gptq, quantize_rtn  # noqa: F401
from . import forget, prune  # noqa: F401,E402
from .forget import forget_sft  # noqa: F401,E402
from .prune import prune_2_4, prune_blocks, prune_unstructured  # noqa: F401,E402
