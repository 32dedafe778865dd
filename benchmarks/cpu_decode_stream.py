"""How fast XLA:CPU streams a decode step's weights: small-row matmuls against the memory bandwidth.

A decode step of B sequences multiplies `[B, hidden]` rows by every weight of the model once, so at
small B it is bound by how fast the dot reads weights, not by FLOPs. This runs the SmolLM2-135M MLP
shape (`[B, 576] x [576, 1536]` gate and up, `[B, 1536] x [1536, 576]` down) through 30 layers of
distinct weights (318 MB, far past the caches) in one jitted function, and the tied LM head
(`[B, 576] x [49152, 576]^T`, 113 MB); it reports each as GB/s of weights read and GFLOP/s, next to a
jitted sum over 256 MB (what the memory gives one reduction). Run it once per `XLA_FLAGS` setting to
compare XLA's dot backends (the default YNNPACK, `--xla_cpu_experimental_ynn_fusion_type=` for Eigen,
`--xla_cpu_experimental_xnn_fusion_type=dot`, `--xla_cpu_experimental_onednn_fusion_type=dot`).

    PYTHONPATH=. python -m benchmarks.cpu_decode_stream --rows 16
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import best_seconds

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 576, 1536, 30, 49152


def mlp_stack(x: jax.Array, gates, ups, downs) -> jax.Array:
    for gate, up, down in zip(gates, ups, downs):
        x = x + 0.01 * ((jax.nn.silu(x @ gate) * (x @ up)) @ down)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16,
                        help="rows per product: the decode step's sequences (1-4096)")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per figure, best kept (1-1000)")
    args = parser.parse_args()
    if not 1 <= args.rows <= 4096 or not 1 <= args.repeats <= 1000:
        parser.error("--rows must be in 1-4096 and --repeats in 1-1000")
    rng = np.random.default_rng(0)

    def weights(shape):
        return [jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(LAYERS)]

    gates, ups = weights((HIDDEN, INTERMEDIATE)), weights((HIDDEN, INTERMEDIATE))
    downs = weights((INTERMEDIATE, HIDDEN))
    embedding = jnp.asarray(rng.standard_normal((VOCAB, HIDDEN), np.float32))
    x = jnp.asarray(rng.standard_normal((args.rows, HIDDEN), np.float32))
    big = jnp.ones((64 << 20,), jnp.float32)
    mlp, head, total = jax.jit(mlp_stack), jax.jit(lambda x, e: x @ e.T), jax.jit(jnp.sum)

    mlp_s = best_seconds(lambda: mlp(x, gates, ups, downs).block_until_ready(), args.repeats)
    head_s = best_seconds(lambda: head(x, embedding).block_until_ready(), args.repeats)
    sum_s = best_seconds(lambda: total(big).block_until_ready(), args.repeats)
    mlp_bytes, head_bytes = 4 * 3 * HIDDEN * INTERMEDIATE * LAYERS, 4 * VOCAB * HIDDEN
    print(f"rows {args.rows}: MLP stack {1e3 * mlp_s:.1f} ms, {mlp_bytes / mlp_s / 1e9:.1f} GB/s, "
          f"{2 * args.rows * mlp_bytes / 4 / mlp_s / 1e9:.0f} GFLOP/s | tied head {1e3 * head_s:.1f} ms, "
          f"{head_bytes / head_s / 1e9:.1f} GB/s | sum of 256 MiB {big.nbytes / sum_s / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
