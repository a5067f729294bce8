"""CPU compute in the Rust core for the adapted layers:

- `fused`: the fused kernel of the DenseLoRA branch for CPU inference (`fused_branch`; its routed
  form for batches that mix tenants of one basis, `fused_routed_branch`; threads, instruction
  sets) and `KernelPath`, through which an adapted layer uses it;
- `dropout`: the dropout masks of training, drawn by the core's counter-based generator.
"""

from .fused import (
    AUTO_HALF_MAX_ROWS,
    KernelPath,
    available_isas,
    fused_branch,
    fused_routed_branch,
    get_num_threads,
    isa,
    set_isa,
    set_num_threads,
)

__all__ = [
    "AUTO_HALF_MAX_ROWS",
    "KernelPath",
    "available_isas",
    "fused_branch",
    "fused_routed_branch",
    "get_num_threads",
    "isa",
    "set_isa",
    "set_num_threads",
]
