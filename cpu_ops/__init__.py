"""NUMA-aware CPU kernels on GGUF blocks and the asynchronous expert executor (see docs/ARCHITECTURE.md)."""
