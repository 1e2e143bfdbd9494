"""GPU kernels (int4/int8 Marlin-style matmuls, MLA decode) and the CUDA-graph decode step (see docs/ARCHITECTURE.md)."""
