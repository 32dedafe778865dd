"""The gated delta rule (Qwen3-Next's Gated DeltaNet): time of each implementation at one dense shape, in one
process, forward and forward + backward.

The XLA reference (`reference.gated_delta_chunked`, chunks of `--chunk`) against, on a GPU, the Pallas
kernels (`pallas_kernels/gated_delta/chunk_kernel.py`, chunks of `chunk_kernel.CHUNK`). Each is jitted and
timed after a warm-up; "temp MB" is XLA's temporary buffer size from the compiled memory analysis; tokens/s
counts rows x tokens; TFLOP/s counts the chunked algorithm's matmuls at the kernel's chunk length L (per
value head and chunk: k k^T, q k^T and w at 2 L^2 K each, u and P v' at 2 L^2 V each, w S, (D q) S and the
state update at 2 L K V each, and the inverse's 2 (log2 L - 1) products of 2 L^3), the backward as twice
the forward. On the CPU the kernel rows are skipped.

    python -m benchmarks.gated_delta [--rows 2 --tokens 2048 --repeats 5]
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

from benchmarks.ssm_scan import timed_compiled
from pallas_kernels.gated_delta import chunk_kernel, ops, reference

# Qwen3-Next-80B-A3B's mixer: 16 q/k heads, 32 value heads, K = V = 128.
QWEN3_NEXT = dict(groups=16, heads=32, key_dim=128, value_dim=128)


def forward_flops(rows: int, tokens: int, heads: int, key_dim: int, value_dim: int, chunk: int) -> float:
    """The module docstring's matmul count of one forward."""
    L, K, V = chunk, key_dim, value_dim
    per_chunk = 2 * L * L * (3 * K + 2 * V) + 3 * 2 * L * K * V + 2 * (math.log2(L) - 1) * 2 * L**3
    return rows * heads * math.ceil(tokens / L) * per_chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=64, help="the reference's chunk length")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    b, t = args.rows, args.tokens
    G, H, K, V = (QWEN3_NEXT[n] for n in ("groups", "heads", "key_dim", "value_dim"))
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    bf16 = jnp.bfloat16
    inputs = ((reference.l2_normalize(normal(b, t, G, K)) * K**-0.5).astype(bf16),
              reference.l2_normalize(normal(b, t, G, K)).astype(bf16), normal(b, t, H, V).astype(bf16),
              -jax.nn.softplus(normal(b, t, H)), jax.nn.sigmoid(normal(b, t, H)))
    segments = jnp.ones((b, t), jnp.int32)
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, rows {b}, tokens {t}, "
          f"heads {G}/{H}, K {K}, V {V}")

    def forward(implementation):
        return lambda *a: ops.gated_delta(*a, segments, args.chunk, implementation=implementation)[0]

    def training(implementation):  # forward + backward of a loss that reads every output
        return jax.grad(lambda *a: jnp.sum(forward(implementation)(*a) ** 2), argnums=(0, 1, 2, 3, 4))

    implementations = [("XLA reference", "reference")]
    if jax.default_backend() == "gpu":
        implementations.append(("Pallas kernel", "kernel"))
    flops = forward_flops(b, t, H, K, V, chunk_kernel.CHUNK)
    print("| implementation | pass | ms per call | tokens/s | TFLOP/s | temp MB |\n|---|---|---|---|---|---|")
    for name, implementation in implementations:
        for pass_, fn, pass_flops in (("forward", forward, flops), ("forward+backward", training, 3 * flops)):
            ms, temp = timed_compiled(fn(implementation), *inputs, repeats=args.repeats)
            rates = f"{b * t / ms * 1e3:.3g} | {pass_flops / ms / 1e9:.2f}"
            print(f"| {name} | {pass_} | {ms:.2f} | {rates} | {temp:.0f} |")


if __name__ == "__main__":
    main()
