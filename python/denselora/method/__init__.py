"""The method: what a DenseLoRA adapter is and computes, in PyTorch.

- `config`: `DenseLoRAConfig`, a dataclass that round-trips through JSON;
- `functional`: the branch as plain tensor operations, the reference every faster path matches;
- `autograd`: the memory-lean autograd path of the branch (r-wide saved tensors);
- `paths`: who computes a layer's branch (the ``branch_path`` knob);
- `layer`: the adapted layer and the shared encoder/decoder of a group;
- `model`: injection into a model and `DenseLoRAModel`, with PEFT's verbs.
"""
