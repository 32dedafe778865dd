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
from pathlib import Path

import jax
import numpy as np

from benchmarks.ffi_build import build_ffi_library

SOURCE = Path(__file__).with_name("stub_device.cc")
TARGET = "jaxllm_stub_busy"


@functools.cache
def _library() -> ctypes.CDLL:
    """Build (once per source version) and load the op; register it with XLA for the CPU."""
    lib = ctypes.cdll.LoadLibrary(str(build_ffi_library(SOURCE, "jaxllm_stub_device")))
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
