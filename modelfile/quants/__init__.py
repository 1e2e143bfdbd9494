"""GGUF block formats: their one declaration each (types.py) and the torch reference dequantizers.

Each format is one function registered by its ggml type; `dequantize` dispatches by table.
"""

from modelfile.quants.types import QUANT_TYPES, block_geometry, declare, dequantize, row_bytes

__all__ = ["QUANT_TYPES", "block_geometry", "declare", "dequantize", "row_bytes"]
