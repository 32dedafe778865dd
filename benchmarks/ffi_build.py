"""Build an XLA:CPU FFI handler from C++ source at run time (the stub device, the BLAS matmul).

The shared library is compiled once per source version (and jax version) with the system's
C++ compiler against jaxlib's FFI headers, into the temp directory; a partial file renamed
into place keeps concurrent builders from loading half a library.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax


def build_ffi_library(source: Path, stem: str, flags: tuple[str, ...] = ("-O2",)) -> Path:
    """The path of `source` compiled with `flags` as a shared library (built now if it is not there yet)."""
    if jax.default_backend() != "cpu":
        raise RuntimeError(f"{source.name} is an XLA:CPU custom call: run with JAX_PLATFORMS=cpu")
    key = hashlib.sha1(source.read_bytes() + jax.__version__.encode() + " ".join(flags).encode()).hexdigest()[:12]
    library = Path(tempfile.gettempdir()) / f"{stem}_{key}.so"
    if library.exists():
        return library
    compiler = shutil.which("c++")
    if compiler is None:
        raise RuntimeError(f"building {source.name} needs a C++ compiler (c++)")
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([compiler, "-std=c++17", *flags, "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
                           str(source), "-o", str(partial)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building {source.name} failed: {done.stderr.strip()[-500:]}")
    partial.rename(library)
    return library
