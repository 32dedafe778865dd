"""Grouped (MoE expert) matmul on an NVIDIA GPU: our Pallas kernel (Triton) and its Mosaic GPU
version vs `jax.lax.ragged_dot` vs a dense bf16 matmul of the same FLOPs, in one run.

One expert projection `[M, K] x [G, K, N] -> [M, N]` with M = tokens * top_k rows, routed
by top-k over random (optionally skewed) router logits:

    mixtral: K=4096, N=14336, G=8,   top-2   (w1/w3 of Mixtral-8x7B)
    qwen3:   K=2048, N=768,   G=128, top-8   (gate/up of Qwen3-30B-A3B)

FLOPs = 2 * M * K * N (the dense equivalent is `[M, K] @ [K, N]`); TFLOP/s = FLOPs /
median time. The two floors of METHOD.md are printed per row: FLOPs over the measured
dense bf16 matmul rate (8192^3), and bytes (lhs + the weights of the experts that got
rows + out, each once) over the measured device-to-device copy bandwidth. With
`--backward` the timed function is the gradient in (lhs, rhs) (twice the FLOPs).

Timing: warm-up calls first (compilation, autotuning); then `--samples` samples of
`--iters` back-to-back calls each, cycling through `--sets` input sets (fresh random
lhs and routing, so repeated calls do not hit the same cached activations), synchronised
once per sample; the per-call time is the sample's time over iters, and the table gives
the median (full samples go to `--json`). Before timing, each kernel's output is checked
against ragged_dot (relative Frobenius error of bf16 operands, < 2e-2). The Mosaic kernel
("mosaic": forward only; its gradient is the Triton backward) runs on Mosaic GPU's
interpreter in a CPU dry run, on 4 simulated SMs.

    PYTHONPATH=. python benchmarks/moe.py [--configs mixtral qwen3] [--tokens 64 512 4096 16384] [--backward]
    PYTHONPATH=. python benchmarks/moe.py --dry-run   # any backend: tiny K=N=64, every path once, no timing claims
    PYTHONPATH=. python benchmarks/moe.py --implementations reference --tokens 64   # CPU: the ragged_dot path alone
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.moe import mosaic_kernel, reference, triton_kernel

CONFIGS = {
    "mixtral": dict(hidden=4096, out=14336, experts=8, top_k=2),
    "qwen3": dict(hidden=2048, out=768, experts=128, top_k=8),
}
IMPLEMENTATIONS = ("kernel", "mosaic", "ragged_dot", "dense")
KERNELS = ("kernel", "mosaic")  # checked against ragged_dot before timing
ALIASES = {"reference": "ragged_dot", "interpret": "kernel"}


def median_seconds(fn, sets, *, iters: int, samples: int, warmup: int = 3) -> tuple[float, list[float]]:
    """Median per-call seconds of `fn(*sets[i % len(sets)])`, and every sample (see the module docstring)."""
    for i in range(warmup):
        jax.block_until_ready(fn(*sets[i % len(sets)]))
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        out = None
        for i in range(iters):
            out = fn(*sets[i % len(sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / iters)
    return float(np.median(times)), times


def ceilings(small: bool) -> dict:
    """Measured device-to-device copy bandwidth (bytes read + written) and dense bf16 matmul rate
    (`small`: quick, smaller sizes for CPU runs)."""
    size = 1 << (24 if small else 30)
    x = jax.random.normal(jax.random.key(1), (size // 4,), jnp.float32)
    copy_s, _ = median_seconds(jax.jit(lambda a: a * 1.0001), [(x,)], iters=2 if small else 20, samples=3)
    n = 512 if small else 8192
    a = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(3), (n, n), jnp.bfloat16)
    matmul_s, _ = median_seconds(jax.jit(jnp.dot), [(a, b), (b, a)], iters=2 if small else 20, samples=3)
    return dict(copy_gb_s=2 * size / copy_s / 1e9, matmul_tflop_s=2 * n**3 / matmul_s / 1e12)


def route(rng: np.random.Generator, tokens: int, experts: int, top_k: int, skew: float) -> np.ndarray:
    """Rows per expert when each token picks top_k distinct experts; expert g is drawn with
    weight (g + 1) ** -skew (Gumbel top-k), so skew 0 is uniform routing."""
    logits = -skew * np.log(np.arange(1, experts + 1)) + rng.gumbel(size=(tokens, experts))
    chosen = np.argpartition(-logits, top_k - 1, axis=1)[:, :top_k]
    return np.bincount(chosen.ravel(), minlength=experts).astype(np.int32)


def make_functions(implementations, kernel_options: dict, interpret: bool, backward: bool) -> dict:
    """name -> jitted f(lhs, rhs, group_sizes, dense_rhs); the dense one multiplies by dense_rhs
    [K, N] (one expert's weight: the same FLOPs), the others ignore it. With `backward`, f returns
    the gradient of sum(out^2)/2 in lhs and in the weight it uses."""
    kernel = functools.partial(triton_kernel.grouped_matmul, interpret=interpret, **kernel_options)
    mosaic = mosaic_kernel.grouped_matmul
    if interpret and "mosaic" in implementations:
        if backward:
            raise SystemExit("the Mosaic kernel's backward is Triton's (GPU only): drop --backward or mosaic")
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        mosaic = functools.partial(mosaic_kernel.gmm, interpret=InterpretGPUParams(), num_sms=4)
    forward = {
        "kernel": (lambda lhs, rhs, gs, dense_rhs: kernel(lhs, rhs, gs), (0, 1)),
        "mosaic": (lambda lhs, rhs, gs, dense_rhs: mosaic(lhs, rhs, gs), (0, 1)),
        "ragged_dot": (lambda lhs, rhs, gs, dense_rhs: reference.grouped_matmul(lhs, rhs, gs), (0, 1)),
        "dense": (lambda lhs, rhs, gs, dense_rhs: jnp.dot(lhs, dense_rhs, preferred_element_type=jnp.float32)
                  .astype(lhs.dtype), (0, 3)),
    }
    functions = {}
    for name in implementations:
        fn, argnums = forward[name]
        if backward:
            fn = jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32) ** 2) / 2, argnums=argnums)
        functions[name] = jax.jit(fn)
    return functions


def relative_error(got: jax.Array, want: jax.Array) -> float:
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="tokens per step (rows = tokens * top_k)")
    parser.add_argument("--implementations", "--implementation", nargs="+", default=list(IMPLEMENTATIONS),
                        choices=sorted(set(IMPLEMENTATIONS) | set(ALIASES)))
    parser.add_argument("--backward", action="store_true", help="time the gradient in (lhs, rhs) instead")
    parser.add_argument("--skew", type=float, default=0.0, help="routing skew (0: uniform over experts)")
    parser.add_argument("--sets", type=int, default=3, help="input sets to cycle through")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--block-m", type=int)
    parser.add_argument("--block-n", type=int)
    parser.add_argument("--block-k", type=int)
    parser.add_argument("--num-warps", type=int)
    parser.add_argument("--num-stages", type=int)
    parser.add_argument("--dry-run", action="store_true", help="tiny K=N=64 shapes, the kernel interpreted off GPU")
    parser.add_argument("--json", help="write every record (with all samples) to this file")
    args = parser.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    implementations = list(dict.fromkeys(ALIASES.get(name, name) for name in args.implementations))
    if args.dry_run and args.backward and "mosaic" in implementations:
        implementations.remove("mosaic")  # its backward is the Triton one, compiled only on a GPU
    if set(KERNELS) & set(implementations) and not on_gpu and not args.dry_run:
        raise SystemExit("the compiled kernel needs an NVIDIA GPU; use --dry-run or --implementations ragged_dot dense")
    tokens_list = args.tokens or ([64] if args.dry_run else [64, 512, 4096, 16384])
    iters, samples = (1, 1) if args.dry_run else (args.iters, args.samples)
    kernel_options = {name: getattr(args, name) for name in ("block_m", "block_n", "block_k", "num_warps", "num_stages")
                      if getattr(args, name) is not None}
    functions = make_functions(implementations, kernel_options, interpret=not on_gpu, backward=args.backward)
    dtype = jnp.bfloat16
    peak = ceilings(small=args.dry_run or not on_gpu)
    print(json.dumps(dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
                          dry_run=args.dry_run, backward=args.backward, skew=args.skew, kernel_options=kernel_options,
                          copy_gb_s=float(f"{peak['copy_gb_s']:.4g}"),
                          matmul_tflop_s=float(f"{peak['matmul_tflop_s']:.4g}"))))

    records = []
    for config in args.configs:
        shape = dict(CONFIGS[config])
        if args.dry_run:
            shape.update(hidden=64, out=64)
        hidden, width, experts, top_k = shape["hidden"], shape["out"], shape["experts"], shape["top_k"]
        key = jax.random.key(sorted(CONFIGS).index(config))
        rhs = jax.random.normal(key, (experts, hidden, width), dtype) * hidden**-0.5
        dense_rhs = rhs[0]
        for tokens in tokens_list:
            rows = tokens * top_k
            rng = np.random.default_rng(tokens)
            sets = []
            for s in range(max(1, args.sets)):
                lhs = jax.random.normal(jax.random.fold_in(key, 1000 * tokens + s), (rows, hidden), dtype)
                sets.append((lhs, rhs, jnp.asarray(route(rng, tokens, experts, top_k, args.skew)), dense_rhs))
            group_sizes = np.asarray(sets[0][2])
            flops = 2 * rows * hidden * width * (2 if args.backward else 1)
            used = int((group_sizes > 0).sum())
            moved = (rows * hidden + used * hidden * width + rows * width) * jnp.dtype(dtype).itemsize
            if args.backward:  # read lhs, rhs, d_out (twice), write d_lhs and d_rhs
                moved = 2 * moved + rows * width * jnp.dtype(dtype).itemsize
            floor_s = max(flops / (peak["matmul_tflop_s"] * 1e12), moved / (peak["copy_gb_s"] * 1e9))

            for checked in (k for k in KERNELS if k in functions and "ragged_dot" in functions):
                got, want = functions[checked](*sets[0]), functions["ragged_dot"](*sets[0])
                names = ("d_lhs", "d_rhs") if args.backward else ("out",)
                for name, g, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(want)):
                    error = relative_error(g, w)
                    assert error < 2e-2, (f"{config} tokens={tokens} {checked} {name}: relative error {error:.2e} "
                                          "vs ragged_dot")

            record = dict(config=config, tokens=tokens, rows=rows, hidden=hidden, out=width, experts=experts,
                          top_k=top_k, experts_used=used, max_rows=int(group_sizes.max()), flops=flops,
                          bytes=moved, floor_ms=floor_s * 1e3)
            for name, fn in functions.items():
                seconds, times = median_seconds(fn, sets, iters=iters, samples=samples)
                record[name] = dict(ms=seconds * 1e3, tflop_s=flops / seconds / 1e12,
                                    spread_ms=[min(times) * 1e3, max(times) * 1e3], samples_ms=[t * 1e3 for t in times])
            records.append(record)

    def cell(record, name, field, fmt):
        return fmt.format(record[name][field]) if name in record else "-"

    def ratio(record, a, b):
        return f"{record[b]['ms'] / record[a]['ms']:.2f}" if a in record and b in record else "-"

    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    # "x vs y" columns are time(y) / time(x): above 1 when ours is faster.
    # "mosaic" is the Mosaic GPU kernel; "mosaic vs ours" > 1 when it beats the Triton kernel.
    print("| config | tokens | rows | ours ms | ours TFLOP/s | mosaic TFLOP/s | ragged_dot TFLOP/s | dense TFLOP/s "
          "| ours speed-up vs ragged_dot | ours vs dense | mosaic vs ours | floor ms | floor / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        of_floor = f"{100 * r['floor_ms'] / r['kernel']['ms']:.0f}%" if "kernel" in r else "-"
        print(f"| {r['config']} | {r['tokens']} | {r['rows']} | {cell(r, 'kernel', 'ms', '{:.4g}')} "
              f"| {cell(r, 'kernel', 'tflop_s', '{:.4g}')} | {cell(r, 'mosaic', 'tflop_s', '{:.4g}')} "
              f"| {cell(r, 'ragged_dot', 'tflop_s', '{:.4g}')} "
              f"| {cell(r, 'dense', 'tflop_s', '{:.4g}')} | {ratio(r, 'kernel', 'ragged_dot')} "
              f"| {ratio(r, 'kernel', 'dense')} | {ratio(r, 'mosaic', 'kernel')} | {r['floor_ms']:.4g} | {of_floor} |")
    return records


if __name__ == "__main__":
    main()
