"""NUMA-aware CPU kernels on GGUF blocks and the asynchronous expert executor (see docs/ARCHITECTURE.md).

Compiled kernels are cached on disk; cpu_ops.kernel_cache says where, and sets aside a damaged
cache entry instead of failing on it.
"""

from cpu_ops import kernel_cache

kernel_cache.install()
