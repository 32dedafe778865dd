"""The launch shared by the recurrent scan kernels (selective scan, SSD, RG-LRU, gated delta): every operand
passed whole (each program indexes its own row, head and feature block), Triton, one pipeline stage."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def call_on_whole_arrays(kernel: Callable, args: Sequence[jax.Array], outputs: Sequence[jax.ShapeDtypeStruct],
                         grid: tuple[int, ...], name: str, num_warps: int, interpret: bool):
    """`kernel` over `grid` with `args` and `outputs` as single whole blocks."""
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole(a.shape) for a in args],
        out_specs=[whole(o.shape) for o in outputs],
        out_shape=outputs,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(*args)
