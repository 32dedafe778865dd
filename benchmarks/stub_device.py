"""A stub device step that takes device time without taking a core or the GIL (CPU backend).

`busy(x, ms)` is an XLA:CPU FFI custom call (`stub_device.cc`, compiled here with the
system's C++ compiler against jaxlib's FFI headers) that holds its computation for `ms`
milliseconds in `clock_nanosleep` and passes `x` through. Dispatch stays asynchronous, so
the host thread runs on while the "device" sleeps, as it would beside an accelerator. Each
call records its start and end (CLOCK_MONOTONIC, the clock of `time.perf_counter`) in C,
so the idle figure needs nothing from Python while the device runs; `spans()` reads them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import numpy as np

SOURCE = Path(__file__).with_name("stub_device.cc")
TARGET = "jaxllm_stub_busy"


@functools.cache
def _library() -> ctypes.CDLL:
    """Build (once per source version) and load the op; register it with XLA for the CPU."""
    source = SOURCE.read_bytes()
    library = Path(tempfile.gettempdir()) / f"jaxllm_stub_device_{hashlib.sha1(source).hexdigest()[:12]}.so"
    if jax.default_backend() != "cpu":
        raise RuntimeError("the stub device op is an XLA:CPU custom call: run with JAX_PLATFORMS=cpu")
    if not library.exists():
        if shutil.which("c++") is None:
            raise RuntimeError("the stub device op needs a C++ compiler (c++) to build stub_device.cc")
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["c++", "-std=c++17", "-O2", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
                        str(SOURCE), "-o", str(partial)], check=True)
        partial.rename(library)
    lib = ctypes.cdll.LoadLibrary(str(library))
    lib.stub_spans.argtypes, lib.stub_spans.restype = [ctypes.POINTER(ctypes.c_double), ctypes.c_int], ctypes.c_int
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.StubBusy), platform="cpu")
    return lib


def busy(x: jax.Array, ms: float) -> jax.Array:
    """`x` (int32) after the device has been busy for `ms` milliseconds."""
    _library()
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype))(x, micros=np.float32(ms * 1000))


def reset() -> None:
    _library().stub_reset()


def spans(limit: int = 1 << 16) -> np.ndarray:
    """[N, 2] (start, end) perf_counter seconds of the calls since `reset()`, in call order."""
    out = np.zeros((limit, 2), np.float64)
    n = _library().stub_spans(out.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), limit)
    return out[: min(n, limit)]
