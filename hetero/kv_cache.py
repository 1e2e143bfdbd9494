"""The KV cache: per attention block and token, one row of the width the family caches.

For MLA the row is the normalized latent [R] and the roped key [P]: (R + P) values per token
and layer, shared by all heads, instead of 2 * H * head_dim (576 against 32768 for
DeepSeek-V3). The width comes from the family's `cached_values_per_token`, the same number
the planner budgets; every executor reads and writes the cache through this object.
"""

import numpy as np
import torch


class KVCache:
    def __init__(self, n_layer: int, max_tokens: int, width: int, device, dtype=torch.float32):
        self.max_tokens = max_tokens
        self._buf = torch.zeros(n_layer, max_tokens, width, device=device, dtype=dtype)
        self.length = 0  # tokens committed for every layer

    @property
    def bytes(self) -> int:
        return self._buf.numel() * self._buf.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self._buf.dtype

    def write(self, layer: int, start: int, rows: torch.Tensor) -> None:
        """rows [T, W] for positions start..start+T-1."""
        self._buf[layer, start : start + rows.shape[0]] = rows

    def write_at(self, layer: int, pos: torch.Tensor, row: torch.Tensor) -> None:
        """row [1, W] at the position held in a device tensor pos [1] (graph-capturable)."""
        self._buf[layer].index_copy_(0, pos, row.to(self._buf.dtype))

    def read(self, layer: int, stop: int) -> torch.Tensor:
        """Rows [S, W] for positions 0..stop-1 (a view)."""
        return self._buf[layer, :stop]

    def layer(self, layer: int) -> torch.Tensor:
        """The layer's whole buffer [max_tokens, W] (the decode kernels mask past the length)."""
        return self._buf[layer]

    def host_array(self) -> np.ndarray:
        """All layers as one float32 numpy array [L, max_tokens, W] sharing the memory (the native
        step writes its rows in place); only for a float32 cache on the CPU."""
        if self._buf.device.type != "cpu" or self._buf.dtype != torch.float32:
            raise ValueError("the native step needs a float32 cache on the CPU")
        return self._buf.numpy()

    def save(self, n: int) -> torch.Tensor:
        """A host copy of every layer's first n rows [L, n, W] (a server's cached conversation)."""
        return self._buf[:, :n].to("cpu", copy=True)

    def restore(self, rows: torch.Tensor) -> None:
        """Put back rows [L, n, W] that save() copied; the cache then holds those n tokens."""
        self._buf[:, : rows.shape[1]].copy_(rows)
        self.length = rows.shape[1]

    def reset(self) -> None:
        self.length = 0
