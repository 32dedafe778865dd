"""Small-M float32 matmuls on this CPU: XLA's dot, torch, and a BLAS sgemm custom call, one process.

For each (M, K, N): `reps` distinct weights `[K, N]` multiplied in sequence (each product's
first column feeds the next input, so the calls cannot overlap), as a model's layers do.
- `jnp`: one jitted function of `jnp.dot`s (XLA:CPU's own matmul); the tied head multiplies by
  the transposed `[N, K]` table, as `Embedding.attend` does.
- `blas`: the same function through `benchmarks.cpu_blas.matmul`: numpy's bundled OpenBLAS
  (`cblas_sgemm`, `cblas_sgemv` for one row) as an XLA:CPU FFI custom call.
- `tiled`: the same function through `benchmarks.cpu_tiled.matmul`: our own register-tiled kernel
  (AVX-512 where the CPU has it) as an XLA:CPU FFI custom call, on XLA's intra-op threads.
- `torch`: `x @ w` with `w [K, N]`, and `torch.nn.functional.linear` with `w [N, K]`
  (transformers' layout), eager.
Each figure is the best of `--repeats` runs (the five interleaved), in GFLOP/s; the shapes are SmolLM2-135M's and
the 15M Llama's (q/o, k/v, gate/up, down, LM head).

    PYTHONPATH=. python -m benchmarks.cpu_matmul
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import cpu_tiled
from benchmarks.cpu_blas import load, matmul, reference

SHAPES = {  # name: (K, N)
    "smollm2 q/o": (576, 576), "smollm2 k/v": (576, 192), "smollm2 gate/up": (576, 1536),
    "smollm2 down": (1536, 576), "smollm2 tied head": (576, 49152),
    "llama-15m q/o": (384, 384), "llama-15m k/v": (384, 128), "llama-15m gate/up": (384, 1024),
    "llama-15m down": (1024, 384), "llama-15m lm head": (384, 8000),
}
WEIGHT_BYTES = 64 << 20  # bytes of distinct weights per timed run: more than the caches hold


def chain(dot, **kwargs):
    def run(x, weights):
        for w in weights:
            y = dot(x, w, **kwargs)
            x = x + 0.0 * y[:, :1]  # a data dependency between the products
        return y

    return run


def best(fns: dict, repeats: int) -> dict[str, float]:
    """Best seconds of each function, the runs interleaved (round robin) so load changes hit all alike."""
    for fn in fns.values():
        fn()
    times = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - start)
    return times


def measure(m: int, k: int, n: int, repeats: int, tied: bool) -> dict[str, float]:
    """GFLOP/s of each implementation; `tied`: the weight is stored `[N, K]` (an embedding table as the head)."""
    reps = max(1, min(16, WEIGHT_BYTES // (4 * k * n)))
    rng = np.random.RandomState(0)
    weights = [rng.standard_normal((k, n)).astype(np.float32) for _ in range(reps)]
    x = rng.standard_normal((m, k)).astype(np.float32)
    jw, jx = [jnp.asarray(w.T if tied else w) for w in weights], jnp.asarray(x)
    tw, tx, tw_t = [torch.from_numpy(w) for w in weights], torch.from_numpy(x), [torch.from_numpy(w.T.copy()) for w in weights]

    xla, blas = jax.jit(chain(reference, transpose_w=tied)), jax.jit(chain(matmul, transpose_w=tied))
    tiled = jax.jit(chain(cpu_tiled.matmul, transpose_w=tied))
    for own in (blas, tiled):
        np.testing.assert_allclose(np.asarray(own(jx, jw)), np.asarray(xla(jx, jw)), rtol=1e-4, atol=1e-3)
    flops = 2 * m * k * n * reps / 1e9
    with torch.no_grad():
        seconds = best({
            "jnp": lambda: xla(jx, jw).block_until_ready(),
            "blas": lambda: blas(jx, jw).block_until_ready(),
            "tiled": lambda: tiled(jx, jw).block_until_ready(),
            "torch_matmul": lambda: chain(torch.matmul)(tx, tw),
            "torch_linear": lambda: chain(torch.nn.functional.linear)(tx, tw_t),
        }, repeats)
    return {key: round(flops / value, 1) for key, value in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    load(), cpu_tiled.load()
    print(json.dumps(dict(jax=jax.__version__, torch=torch.__version__, numpy=np.__version__,
                          torch_threads=torch.get_num_threads())))
    print("| shape | M | K | N | jnp GFLOP/s | blas GFLOP/s | tiled GFLOP/s | torch matmul | torch linear | blas / jnp "
          "| tiled / jnp | best own / torch best |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.shapes:
        k, n = SHAPES[name]
        for m in args.rows:
            r = measure(m, k, n, args.repeats, tied="tied" in name)
            torch_best = max(r["torch_matmul"], r["torch_linear"])
            print(f"| {name} | {m} | {k} | {n} | {r['jnp']} | {r['blas']} | {r['tiled']} | {r['torch_matmul']} "
                  f"| {r['torch_linear']} | {r['blas'] / r['jnp']:.2f} | {r['tiled'] / r['jnp']:.2f} "
                  f"| {max(r['blas'], r['tiled']) / torch_best:.2f} |", flush=True)


if __name__ == "__main__":
    main()
