"""hetero: run DeepSeek-V2/V3/R1 GGUF models with dense parts on the GPU and experts on the CPU."""

from hetero.errors import HeteroError
from hetero.model import Model, load_model

__all__ = ["HeteroError", "Model", "load_model"]
