"""A BLAS sgemm as an XLA:CPU custom call, for `benchmarks.cpu_matmul` (measured; not used by the engine).

`matmul(x, w)` multiplies float32 `x [M, K]` by `w [K, N]` (or `w [N, K]` transposed, as a tied
embedding table) inside a jitted function through `cpu_blas.cc`: an XLA FFI handler compiled
at first use (`benchmarks.ffi_build`), calling the `cblas_sgemm` / `cblas_sgemv` of numpy's bundled
OpenBLAS (`scipy_openblas64`, ILP64), which every process that imports numpy has loaded.
Nothing is downloaded or linked at build time. `load()` says why when a piece is missing.

It stays out of the engine: on the 2-core development machine it did not beat XLA:CPU's own dot
at serving shapes, and under load OpenBLAS's threads made it many times slower
(benchmarks/RESULTS.md, "CPU small-M matmuls through BLAS").
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.ffi_build import build_ffi_library

SOURCE = Path(__file__).with_name("cpu_blas.cc")
TARGET = "jaxllm_cpu_blas_f32"
# numpy's OpenBLAS: cblas_sgemm / cblas_sgemv with 64-bit integers, under a scipy_ prefix and 64_ suffix
SYMBOLS = ("scipy_cblas_sgemm64_", "scipy_cblas_sgemv64_")


def openblas_candidates() -> list[Path]:
    """numpy's bundled OpenBLAS files: the ones this process has mapped, then numpy's library folders."""
    found: list[Path] = []
    maps = Path("/proc/self/maps")
    if maps.exists():
        for line in maps.read_text().splitlines():
            path = Path(line.split(maxsplit=5)[-1]) if line.count(" ") >= 5 else None
            if path is not None and "openblas64" in path.name and path not in found:
                found.append(path)
    package = Path(np.__file__).parent
    for folder in (package.parent / "numpy.libs", package / ".dylibs"):
        found += sorted(p for p in folder.glob("*openblas64*") if p not in found)
    return found


def _blas_addresses() -> list[int]:
    for path in openblas_candidates():
        try:
            blas = ctypes.CDLL(str(path))
            return [ctypes.cast(getattr(blas, name), ctypes.c_void_p).value for name in SYMBOLS]
        except (OSError, AttributeError):
            continue
    raise RuntimeError(f"numpy's bundled OpenBLAS ({', '.join(SYMBOLS)}) was not found")


@functools.cache
def load() -> str:
    """Build, hand over the BLAS functions and register the custom call (once); its target name."""
    addresses = _blas_addresses()
    lib = ctypes.CDLL(str(build_ffi_library(SOURCE, "jaxllm_cpu_blas")))
    lib.cpu_blas_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.cpu_blas_set(*addresses)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.CpuBlasMatmulF32), platform="cpu")
    return TARGET


def reference(x: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
    """`x @ w` (`x @ w.T` with `transpose_w`): what the custom call must equal."""
    return jnp.dot(x, w.T if transpose_w else w)


def custom_matmul(target: str, x: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
    """float32 `x [M, K] @ w [K, N]` (`w [N, K]` with `transpose_w`) through the registered FFI `target`."""
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0] if transpose_w else w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(target, out)(x, w, transpose_w=np.int32(transpose_w))


def matmul(x: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
    """`custom_matmul` through OpenBLAS; traceable under jit."""
    return custom_matmul(load(), x, w, transpose_w)
