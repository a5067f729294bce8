"""Adapter storage, read and written by the Rust core:

- `sources`: what an adapter is on disk and where one comes from (a directory or ``bundle.dl:name``);
- `adapter`: adapters opened from either the same way (`open_adapter`: memory-mapped, validated once,
  with their group layouts), loaded as torch tensors and saved to either;
- `bundle`: ``.dl`` bundles, many adapters in one memory-mapped, checksummed file;
- `basis`: shared bases and their tenants (cores only): fingerprints, tenant configs, finding a basis;
- `peft`: the PEFT LoRA export;
- `atomic`: directories written whole or not at all;
- `arrays`: torch tensors <-> the numpy arrays the core takes (bfloat16 as its bit patterns).

Names are imported on first use: the bundle commands of the command line run without PyTorch.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "sources": ["BUNDLE_SUFFIX", "CONFIG_FILE", "TENSORS_FILE", "PathLike", "split_source"],
        "adapter": ["GroupLayout", "OpenedAdapter", "adapter_layout", "load_adapter", "open_adapter", "save_adapter", "save_adapter_to"],
        "bundle": ["Bundle", "pack"],
        "peft": ["is_peft_lora", "save_peft_lora"],
        "atomic": ["atomic_directory"],
        "basis": ["fingerprint", "is_tenant", "resolve_basis"],
    },
    submodules=["adapter", "arrays", "atomic", "basis", "bundle", "peft", "sources"],
)
