"""RecurrentGemma's RG-LRU scan: time and memory of each implementation at one dense shape, in one process.

The associative-scan reference (`pallas_kernels/rglru/reference.py`, the CPU path) against a
sequential `lax.scan` over tokens (the plain alternative) and, on a GPU, the Pallas kernel
(`pallas_kernels/rglru/triton_kernel.py`, sequential in time). Each row is timed forward and
forward + backward (the gradient of a weighted sum, as training takes it), jitted, after a
warm-up; "temp MB" is XLA's temporary buffer size from the compiled memory analysis. On the CPU
the kernel rows are skipped.

    python -m benchmarks.rglru_scan [--rows 1 --tokens 2048 --repeats 5]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.ssm_scan import _timed
from pallas_kernels.rglru import ops, reference

LRU_WIDTH = 2560  # RecurrentGemma-2B


def _sequential(decay: jax.Array, inputs: jax.Array) -> jax.Array:
    """The plain recurrence as a `lax.scan` over tokens (the baseline)."""

    def step(h, operands):
        h = operands[0] * h + operands[1]
        return h, h

    _, states = jax.lax.scan(step, jnp.zeros_like(decay[:, 0]), (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(inputs, 1, 0)))
    return jnp.moveaxis(states, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    b, t, d = args.rows, args.tokens, LRU_WIDTH
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    decay = jax.random.uniform(keys[0], (b, t, d), jnp.float32, 0.5, 1.0)
    inputs, weights = jax.random.normal(keys[1], (b, t, d)), jax.random.normal(keys[2], (b, t, d))
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, rows {b}, tokens {t}, channels {d}")

    scans = [("associative (reference)", reference.plain_scan), ("sequential lax.scan", _sequential)]
    if jax.default_backend() == "gpu":
        scans.append(("Pallas kernel", lambda a, x: ops._scan(a, x, "kernel")))
    print("| scan | forward ms | temp MB | forward + backward ms | temp MB |\n|---|---|---|---|---|")
    for name, scan in scans:
        forward = _timed(scan, decay, inputs, repeats=args.repeats)
        backward = _timed(jax.grad(lambda a, x: jnp.sum(scan(a, x) * weights), argnums=(0, 1)), decay, inputs,
                          repeats=args.repeats)
        print(f"| {name} | {forward[0]:.1f} | {forward[1]:.0f} | {backward[0]:.1f} | {backward[1]:.0f} |")


if __name__ == "__main__":
    main()
