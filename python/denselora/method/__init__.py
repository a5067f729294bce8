"""The method: what a DenseLoRA adapter is and computes, in PyTorch."""
