"""GPU kernels (Marlin-style int4/int8 matmuls, MLA decode) and the CUDA-graph decode step.

See docs/ARCHITECTURE.md.
"""
