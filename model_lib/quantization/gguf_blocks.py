"""GGUF's Q4_0, Q4_1 and Q8_0 blocks kept quantized (`quantization="gguf"`).

ggml cuts each row of a `[out, in]` weight into blocks of 32 values along the input, one block
being (GGUF types; `d`, `m` float16):
- Q4_0: `d`, then 16 bytes of 4-bit `q`: `w = (q - 8) * d`;
- Q4_1: `d`, `m`, then 16 bytes of 4-bit `q`: `w = q * d + m`;
- Q8_0: `d`, then 32 int8 `q`: `w = q * d`.
Byte j of a 4-bit block holds values j (low nibble) and j + 16 (high nibble).

In our `[in, out]` kernel the blocks run down the rows, so a block is a column slice: the 16
bytes of a 4-bit block become 16 packed rows of `pallas_kernels.block_matmul`'s layout unchanged
(its low nibbles are a block's first half, as ggml's), the fp16 `d` and `m` become `scales` and
`offsets [in / 32, out]` kept in float16. The weight dequantizes to exactly what
`gguf.quants.dequantize` gives in float32 (the same operations in the same order, on exact
float16 values), and the matmul is `block_matmul` (a fused Pallas kernel on GPU, jnp elsewhere).
Loaded memory per weight is the file's: 0.5625 bytes (Q4_0), 0.625 (Q4_1), 1.0625 (Q8_0).
"""

from __future__ import annotations


from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib.quantization.base import QuantizedWeight, QuantState, on_device
from pallas_kernels.block_matmul import block_matmul
from pallas_kernels.block_matmul.reference import dequantize

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    """How one GGUF block type maps onto `block_matmul`: value bits, zero point, whether `m` follows `d`."""

    bits: int
    zero: int
    has_min: bool

    @property
    def header(self) -> int:
        """Bytes of float16 constants in front of a block's values."""
        return 4 if self.has_min else 2

    @property
    def nbytes(self) -> int:
        return self.header + BLOCK * self.bits // 8


BLOCK_TYPES = {"Q4_0": BlockType(4, 8, False), "Q4_1": BlockType(4, 0, True), "Q8_0": BlockType(8, 0, False)}


class GGUFBlockWeight(QuantizedWeight):
    """One `[in, out]` kernel in a GGUF block type: `qs`, float16 `scales` (and `offsets`) `[in / 32, out]`."""

    def __init__(self, qtype: str, qs: Any, scales: Any, offsets: Any = None):
        kind = BLOCK_TYPES[qtype]
        self.qtype, self.bits, self.zero = qtype, kind.bits, kind.zero
        self.qs = QuantState(on_device(qs))  # [in / 2, out] uint8 (4 bits) or [in, out] int8
        self.scales = QuantState(on_device(scales))
        self.offsets = QuantState(on_device(offsets)) if offsets is not None else nnx.data(None)
        self.shape = (qs.shape[0] * (2 if kind.bits == 4 else 1), qs.shape[1])

    def _offsets(self) -> jax.Array | None:
        return None if self.offsets is None else self.offsets[...]

    def matmul(self, x: jax.Array) -> jax.Array:
        return block_matmul(x, self.qs[...], self.scales[...], self._offsets(), bits=self.bits, zero=self.zero)

    def dequantize(self, dtype: Any) -> jax.Array:
        return dequantize(self.qs[...], self.scales[...], self._offsets(), self.bits, self.zero, dtype)

    def take_columns(self, ids: jax.Array, dtype: Any) -> jax.Array:
        """Kernel columns `ids` as rows `[..., in]` in `dtype`: the lookup of an embedding table kept as blocks
        (`[vocab, features]` in the file, so its blocks run along the features, as a kernel's)."""
        columns = lambda a: None if a is None else jnp.take(a, ids.reshape(-1), axis=1)  # noqa: E731
        w = dequantize(columns(self.qs[...]), columns(self.scales[...]), columns(self._offsets()), self.bits,
                       self.zero, dtype)  # [in, ids]
        return w.T.reshape(*ids.shape, -1)


def _float16(columns: np.ndarray) -> np.ndarray:
    """`[out, blocks, 2]` bytes -> float16 `[blocks, out]`."""
    return np.ascontiguousarray(columns).view(np.float16)[..., 0].T.copy()


@dataclass
class HostGGUFBlocks:
    """One weight's GGUF blocks on the host, as the file holds them: `raw [out, in / 32 * block bytes]` uint8.

    The same protocol as the pre-quantized checkpoints' host weights (`shape` in our `[in, out]`
    layout, `dequantized()` the float32 HF weight, `to_weight()` the device form).
    """

    qtype: str
    raw: np.ndarray

    @property
    def kind(self) -> BlockType:
        return BLOCK_TYPES[self.qtype]

    @property
    def shape(self) -> tuple[int, int]:
        out, width = self.raw.shape
        return width // self.kind.nbytes * BLOCK, out

    def dequantized(self) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        return np.asarray(gguf_dequantize(self.raw, GGMLQuantizationType[self.qtype]), np.float32)

    def to_weight(self, axes: Sequence[str | None] | None = None, head_size: int = 1) -> GGUFBlockWeight:
        """The device form; `axes` / `head_size` (the host protocol's sharding facts) are unused: GGUF
        blocks are not sharded (`quantization="gguf"` with a mesh is refused)."""
        kind, out = self.kind, self.raw.shape[0]
        blocks = self.raw.reshape(out, -1, kind.nbytes)  # [out, in / 32, block bytes]
        values = blocks[..., kind.header :].reshape(out, -1)  # [out, in / 2] packed or [out, in] bytes
        qs = np.ascontiguousarray(values.T if kind.bits == 4 else values.view(np.int8).T)
        offsets = _float16(blocks[..., 2:4]) if kind.has_min else None
        return GGUFBlockWeight(self.qtype, qs, _float16(blocks[..., :2]), offsets)


def quantize_gguf(weight: np.ndarray, qtype: str) -> GGUFBlockWeight:
    """A float `[in, out]` kernel quantized by the `gguf` package's own quantizer (host side)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if qtype not in BLOCK_TYPES:
        raise ValueError(f"GGUF block type {qtype!r} is not kept quantized; supported: {', '.join(BLOCK_TYPES)}")
    if weight.shape[0] % BLOCK:
        raise ValueError(f"a {qtype} kernel needs an input width divisible by {BLOCK}, got {weight.shape[0]}")
    raw = quantize(np.ascontiguousarray(np.asarray(weight, np.float32).T), GGMLQuantizationType[qtype])
    return HostGGUFBlocks(qtype, raw).to_weight()
