"""SPM: one-dimensional adapters ("membranes") with per-sample Facilitated Transport (Lyu et al., CVPR 2024).

membrane.py (the low-rank deltas, their files and the stack that applies them), transport.py (Facilitated Transport:
the gates, for both adapters), hooks.py (diffusers), kernel.py (the fused CUDA kernel), train.py (training with Latent
Anchoring). Equations: docs/methods.md §1.
"""
from .hooks import (
    UNCOND_GATES,
    TransportFallbackWarning,
    UncondGate,
    UncondGateWarning,
    attach_membranes,
    check_uncond_gate,
    detach_membranes,
    membrane_gates,
    membrane_targets,
    record_prompts,
)
from .membrane import (
    KOHYA_PREFIX,
    Combine,
    Membrane,
    MembraneFileError,
    MembraneLayer,
    MembraneStack,
    MissingConceptsError,
    is_target,
    kohya_name,
    kohya_tensors,
    ldm_key,
    load_membrane,
    merged_deltas,
    module_path,
    module_path_from_ldm_key,
    save_membrane,
    stack_membranes,
)
from .transport import (
    CACHE_LIMIT,
    CAST_DTYPES,
    Concepts,
    Metric,
    TokenRecord,
    Transport,
    row_keys,
    token_sets,
    transport_strengths,
)

__all__ = [
    "CACHE_LIMIT", "CAST_DTYPES", "KOHYA_PREFIX", "Combine", "Concepts", "Membrane", "MembraneFileError",
    "MembraneLayer", "MembraneStack", "Metric", "MissingConceptsError", "TokenRecord", "Transport",
    "TransportFallbackWarning", "UNCOND_GATES", "UncondGate", "UncondGateWarning", "attach_membranes",
    "check_uncond_gate", "detach_membranes", "is_target", "record_prompts",
    "kohya_name", "kohya_tensors", "ldm_key", "load_membrane", "membrane_gates", "membrane_targets", "merged_deltas",
    "module_path", "module_path_from_ldm_key", "row_keys", "save_membrane", "stack_membranes", "token_sets",
    "transport_strengths",
]
