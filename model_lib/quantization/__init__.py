"""Stored weight formats, one module each, behind one interface (`QuantizedWeight`: matmul, dequantize).

- `nf4`: NF4 with double quantization (QLoRA's frozen base; trains LoRA adapters).
- `int8`: weight-only int8, one scale per output channel.
- `int4`: weight-only int4, group scales and zero points (AWQ / GPTQ's scheme).
- `fp8`: float8_e4m3fn weights with tensor, channel, group or 128 x 128 block scales; W8A8 compute.
- `gguf_blocks`: GGUF's Q4_0, Q4_1 and Q8_0 blocks of 32 as the file holds them (`quantization="gguf"`).
- `stacked`: MoE expert stacks of any of these formats, one quantized weight per expert.
The matmuls of int8, int4 and fp8 are `pallas_kernels.quantized_matmul` (fused kernels / FP8 GEMMs on
GPU), GGUF blocks' `pallas_kernels.block_matmul` (a fused kernel on GPU).
"""

from model_lib.quantization.base import QuantizedWeight, QuantState
from model_lib.quantization.fp8 import Fp8Weight, quantize_fp8
from model_lib.quantization.int4 import Int4Weight, quantize_int4
from model_lib.quantization.int8 import Int8Weight, dequantize_int8, quantize_int8
from model_lib.quantization.nf4 import (
    ABSMAX_BLOCK,
    BLOCK,
    NF4_CODE,
    NF4Host,
    NF4Weight,
    dequantize_nf4,
    nf4_matmul,
    nf4_storage_axes,
    nf4_take_rows,
    quantize_nf4,
    quantize_nf4_host,
    rows_layout,
)

__all__ = [
    "ABSMAX_BLOCK",
    "BLOCK",
    "Fp8Weight",
    "NF4_CODE",
    "Int4Weight",
    "Int8Weight",
    "NF4Host",
    "NF4Weight",
    "QuantState",
    "QuantizedWeight",
    "dequantize_int8",
    "dequantize_nf4",
    "nf4_matmul",
    "nf4_storage_axes",
    "nf4_take_rows",
    "quantize_fp8",
    "quantize_int4",
    "quantize_int8",
    "quantize_nf4",
    "quantize_nf4_host",
    "rows_layout",
]
