"""d2dmoe_kernels: the dynamic-k expert layer's compute (folder ``kernels/``, import name ``d2dmoe_kernels``).

``reference`` holds the plain-torch masked reference every implementation is tested against;
``cpu`` the CPU body that skips unselected experts; ``op`` registers the opaque custom op
``torch.ops.d2dmoe.dynamic_k_experts`` that the vLLM plugin calls.
"""

from d2dmoe_kernels.reference import (
    ACTIVATIONS,
    apply_activation,
    dynamic_k_experts_reference,
    router_scores,
    select_experts,
)

__all__ = ["ACTIVATIONS", "apply_activation", "dynamic_k_experts_reference", "router_scores", "select_experts"]
