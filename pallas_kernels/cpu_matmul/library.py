"""Build and register the BLAS custom call (`sgemm.cc`) once per process; say why when it cannot.

The handler is compiled at first use with the system's C++ compiler against jaxlib's FFI
headers (cached in the temp directory by source hash), and given the address of the
`cblas_sgemm` and `cblas_sgemv` of numpy's bundled OpenBLAS (`scipy_openblas64`, ILP64), which is loaded in
every process that imports numpy. Nothing is downloaded and nothing is linked at build time.
`load()` returns None with a reason when any piece is missing; callers then use jnp.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import numpy as np

logger = logging.getLogger("pallas_kernels")

SOURCE = Path(__file__).with_name("sgemm.cc")
TARGET = "jaxllm_cpu_matmul_f32"
# numpy's OpenBLAS: cblas_sgemm / cblas_sgemv with 64-bit integers, under a scipy_ prefix and 64_ suffix
SYMBOLS = ("scipy_cblas_sgemm64_", "scipy_cblas_sgemv64_")


def openblas_candidates() -> list[Path]:
    """numpy's bundled OpenBLAS files: the ones this process mapped first, then numpy's library folders."""
    found: list[Path] = []
    maps = Path("/proc/self/maps")
    if maps.exists():
        for line in maps.read_text().splitlines():
            path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
            if "openblas64" in Path(path).name and Path(path) not in found:
                found.append(Path(path))
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


def _build() -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha1(source + jax.__version__.encode()).hexdigest()[:12]
    library = Path(tempfile.gettempdir()) / f"jaxllm_cpu_matmul_{key}.so"
    if library.exists():
        return library
    compiler = os.environ.get("CXX") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++ or $CXX) to build the BLAS custom call")
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
                           str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building {SOURCE.name} failed: {done.stderr.strip()[-500:]}")
    partial.rename(library)
    return library


@functools.cache
def load() -> str | None:
    """The registered custom-call target's name, or None (logged once, with the reason) when unavailable."""
    if os.environ.get("JAXLLM_CPU_BLAS", "1") == "0":
        logger.info("cpu_matmul: BLAS custom call turned off (JAXLLM_CPU_BLAS=0); XLA:CPU dots are used")
        return None
    try:
        addresses = _blas_addresses()
        lib = ctypes.CDLL(str(_build()))
        lib.cpu_matmul_set_blas.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cpu_matmul_set_blas(*addresses)
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.CpuMatmulF32), platform="cpu")
    except (RuntimeError, OSError, AttributeError) as error:
        logger.warning("cpu_matmul: the BLAS custom call is unavailable (%s); XLA:CPU dots are used", error)
        return None
    return TARGET
