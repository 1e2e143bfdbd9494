"""hetero: run DeepSeek-V2/V3/R1 GGUF models with dense parts on the GPU and experts on the CPU."""

from hetero.model import Model, load_model
from modelfile.errors import HeteroError

__all__ = ["HeteroError", "Model", "load_model"]
