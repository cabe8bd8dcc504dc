"""Dequantizing matmul: x @ dequantize(codes, scales, zeros) with int8 or packed int4 weight codes."""

from pallas_kernels.quantized_matmul.api import IMPLEMENTATIONS, OP, available_implementations, quantized_matmul
from pallas_kernels.quantized_matmul.packing import dequantize, pack_int4, unpack_int4

__all__ = ["IMPLEMENTATIONS", "OP", "available_implementations", "dequantize", "pack_int4", "quantized_matmul",
           "unpack_int4"]
