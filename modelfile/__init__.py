"""What hetero knows before it runs anything: the GGUF file (header, tensors, split sets), the
model's config and tensor inventory, tensor kinds, the block formats' reference
dequantization, and the error type and cache location every layer shares.

Everything else builds on this package and it imports none of them: placement plans from it,
cpu_ops and gpu_ops run its blocks, hetero runs the model.
"""
