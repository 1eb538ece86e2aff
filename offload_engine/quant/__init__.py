"""Block-quantized optimizer state: code maps, block formats and the reference codec."""
from .codec import FORMATS, BlockFormat, dequantize_blockwise, quantize_blockwise
from .maps import dynamic_map, linear_unsigned_map

__all__ = ["FORMATS", "BlockFormat", "dequantize_blockwise", "quantize_blockwise", "dynamic_map",
           "linear_unsigned_map"]
