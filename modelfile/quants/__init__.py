"""GGUF block formats, dequantized with torch so the same code serves CPU and GPU tensors.

Each format is one function registered by its ggml type; `dequantize` dispatches by table.
"""

from modelfile.quants.table import BLOCK_FORMATS, block_geometry, dequantize, row_bytes

__all__ = ["BLOCK_FORMATS", "block_geometry", "dequantize", "row_bytes"]
