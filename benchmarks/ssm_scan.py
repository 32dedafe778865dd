"""State-space scans: time and memory of each implementation at one dense shape, in one process.

Mamba (`selective_scan`): the associative-scan reference against, on a GPU, the Pallas kernel
(`pallas_kernels/ssm/triton_kernel.py`, sequential in time). Mamba-2: the chunked SSD on dense rows,
forward and forward + backward (a loss reading every output, gradients of all six inputs), the reference
against, on a GPU, the Pallas kernels (`pallas_kernels/ssm/ssd_kernel.py`); then a ragged serving step
(one row of `--sequences` sequences, each from its own state) through `reference.ssd_chunked_states` (the
serving path off CUDA), the associative `ssd_scan` (the serving path before it) and, on a GPU, the Pallas kernel
(`ssd_kernel.ssd_from_states`). Each is jitted and timed after a
warm-up; "temp MB" is XLA's temporary buffer size from the compiled memory analysis (what the
associative scans spend on `[T, state]` intermediates). On the CPU the kernel rows are skipped.

    python -m benchmarks.ssm_scan [--rows 1 --tokens 512 --sequences 8 --repeats 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from pallas_kernels.ssm import ops, reference

# Mamba-130m's mixer (D = 1536, N = 16) and Mamba-2-130m's (24 heads of 64, N = 128, one group).
MAMBA = dict(channels=1536, state=16)
MAMBA2 = dict(heads=24, head_dim=64, groups=1, state=128)


def timed_compiled(fn, *args, repeats: int) -> tuple[float, float]:
    """Milliseconds per call of `fn` compiled for `args` (after one warm call), and its temporaries in MB."""
    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.memory_analysis()
    temp_mb = (analysis.temp_size_in_bytes if analysis is not None else 0) / 2**20
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(compiled(*args))
    return (time.perf_counter() - start) / repeats * 1e3, temp_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--sequences", type=int, default=8, help="sequences in the ragged serving step")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    b, t = args.rows, args.tokens
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    segments = jnp.ones((b, t), jnp.int32)
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, rows {b}, tokens {t}")

    d, n = MAMBA["channels"], MAMBA["state"]
    mamba = (normal(b, t, d), jax.nn.softplus(normal(b, t, d)), -jnp.exp(normal(d, n)), normal(b, t, n),
             normal(b, t, n), normal(d))
    rows = [("mamba selective scan: reference (associative)",
             lambda *a: reference.selective_scan(*a, segments)[0], mamba)]
    if jax.default_backend() == "gpu":
        rows.append(("mamba selective scan: Pallas kernel",
                     lambda *a: ops.selective_scan(*a, segments, implementation="kernel")[0], mamba))
    h, p, g, n2 = MAMBA2["heads"], MAMBA2["head_dim"], MAMBA2["groups"], MAMBA2["state"]
    mamba2 = (normal(b, t, h, p), jax.nn.softplus(normal(b, t, h)), -jnp.exp(normal(h)), normal(b, t, g, n2),
              normal(b, t, g, n2), normal(h))
    # The serving step: one row of `sequences` equal runs (the last takes the remainder), each from its state.
    ragged = jnp.minimum(jnp.arange(t) // max(t // args.sequences, 1), args.sequences - 1)[None] + 1
    states = normal(1, args.sequences, h, p, n2)
    serving = tuple(a[:1] for a in mamba2)

    def ssd_forward(implementation):
        return lambda *a: ops.ssd_chunked(*a, segments, args.chunk, implementation=implementation)[0]

    def training(fn):  # forward + backward of a loss that reads every output
        return jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=tuple(range(len(mamba2))))

    ssd = [(f"chunked reference (chunks of {args.chunk})", "reference")]
    if jax.default_backend() == "gpu":
        ssd.append(("Pallas kernels", "kernel"))
    for name, implementation in ssd:
        rows += [(f"mamba-2 SSD forward: {name}", ssd_forward(implementation), mamba2),
                 (f"mamba-2 SSD forward+backward: {name}", training(ssd_forward(implementation)), mamba2)]
    rows += [
        (f"mamba-2 serving step, {args.sequences} sequences: chunked with per-sequence states (chunks of {args.chunk})",
         lambda *a: reference.ssd_chunked_states(*a, ragged, args.chunk, states), serving),
        (f"mamba-2 serving step, {args.sequences} sequences: associative (the previous serving path)",
         lambda *a: reference.ssd_scan(*a, ragged, states), serving),
    ]
    if jax.default_backend() == "gpu":
        rows.append((f"mamba-2 serving step, {args.sequences} sequences: Pallas kernel from per-sequence states",
                     lambda *a: ops.ssd_chunked_states(*a, ragged, args.chunk, states, implementation="kernel")[0],
                     serving))
    print("| scan | ms per call | temp MB |\n|---|---|---|")
    for name, fn, inputs in rows:
        ms, temp = timed_compiled(fn, *inputs, repeats=args.repeats)
        print(f"| {name} | {ms:.1f} | {temp:.0f} |")


if __name__ == "__main__":
    main()
