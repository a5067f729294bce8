"""CPU compute in the Rust core for the adapted layers."""

from .fused import available_isas, dense_branch, get_num_threads, isa, set_isa, set_num_threads

__all__ = ["available_isas", "dense_branch", "get_num_threads", "isa", "set_isa", "set_num_threads"]
