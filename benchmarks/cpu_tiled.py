"""An own register-tiled float32 matmul for a few rows, as an XLA:CPU custom call, for `benchmarks.cpu_matmul`.

`matmul(x, w)` multiplies `x [M, K]` by `w [K, N]` (or `w [N, K]` transposed, as a tied embedding table)
inside a jitted function through `cpu_tiled.cc`, built at first use for this machine's vector width
(`-O3 -march=native`, `benchmarks.ffi_build`). Measured, not used by the engine: on the development machine
it did not beat XLA's own dot at decode rows (benchmarks/RESULTS.md, "An own register-tiled matmul for decode
rows").
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import jax

from benchmarks.cpu_blas import custom_matmul
from benchmarks.ffi_build import build_ffi_library

SOURCE = Path(__file__).with_name("cpu_tiled.cc")
TARGET = "jaxllm_cpu_tiled_f32"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast")  # FMA contraction is off under -std=c++17 otherwise


@functools.cache
def load() -> str:
    """Build and register the custom call (once); its target name."""
    lib = ctypes.CDLL(str(build_ffi_library(SOURCE, "jaxllm_cpu_tiled", FLAGS)))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxllmSmallMatmulF32), platform="cpu")
    return TARGET


def matmul(x: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
    """`custom_matmul` through the tiled kernel; traceable under jit."""
    return custom_matmul(load(), x, w, transpose_w)
