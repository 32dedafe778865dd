"""Attention and matmul kernels for NVIDIA GPUs, each beside a plain-jnp reference.

One folder per op: `reference.py` defines correct (and is the CPU path), kernel
files hold the Pallas implementations, `ops.py` is the public function that picks
one by backend and shape. Nothing here knows about models.
"""
