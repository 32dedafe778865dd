"""Tile sizing shared by the Triton-style Pallas matmul kernels (grouped and quantized matmul)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_BLOCK = 16  # the smallest side of a Triton dot tile


def fit_block(dim: int, preferred: int) -> int | None:
    """Largest power of two <= `preferred` (and >= 16) dividing `dim`; None if there is none."""
    block = pl.next_power_of_2(max(preferred, MIN_BLOCK))
    if block > preferred:
        block //= 2
    while block >= MIN_BLOCK:
        if dim % block == 0:
            return block
        block //= 2
    return None


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sides and launch settings of one kernel call."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
