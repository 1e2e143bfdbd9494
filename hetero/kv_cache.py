"""The MLA latent KV cache: per token and layer, one normalized latent [R] and one roped key [r].

This is what makes MLA cheap to serve: (R + r) values per token per layer, shared by all
heads, instead of 2 * H * head_dim. For DeepSeek-V3 that is 576 values against 32768.
"""

import torch


class LatentKVCache:
    def __init__(self, n_layer: int, max_tokens: int, kv_lora_rank: int, rope_dim: int, device, dtype=torch.float32):
        self.max_tokens = max_tokens
        self.rank = kv_lora_rank
        self.buf = torch.zeros(n_layer, max_tokens, kv_lora_rank + rope_dim, device=device, dtype=dtype)
        self.length = 0  # tokens committed for every layer

    @property
    def bytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()

    def write(self, layer: int, start: int, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """latent [T, R] and k_rope [T, r] for positions start..start+T-1."""
        stop = start + latent.shape[0]
        self.buf[layer, start:stop, : self.rank] = latent
        self.buf[layer, start:stop, self.rank :] = k_rope

    def read(self, layer: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [S, R], rope keys [S, r]) for positions 0..stop-1."""
        view = self.buf[layer, :stop]
        return view[:, : self.rank], view[:, self.rank :]

    def reset(self) -> None:
        self.length = 0
