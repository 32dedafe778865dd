"""Weight-only int4 / int8, GGUF Q4_1 / Q8_0 blocks and W8A8 FP8 matmul on an NVIDIA GPU: ours vs the
XLA reference (dequantize, then dot) vs a dense bf16 matmul of the same shape, in one run.
GGUF blocks of 32 run `pallas_kernels.block_matmul`.

"ours" is the fused Pallas kernel for int4 / int8; for FP8 (`--formats fp8`: 128 x 128 block
scales as DeepSeek-V3 ships, activations quantized per token and 128-wide group) it is what
`fp8_matmul` picks on CUDA: the Pallas kernel up to 64 rows, XLA's FP8 GEMMs beyond.

Shapes: Llama-3-8B's gate/up (K=4096, N=14336) and down (K=14336, N=4096) projections at decode
batches (M rows) and a prefill chunk. A decode call is bound by reading the weights: GB/s counts
the bytes each path must read (stored weights + scales + x + out) over its median time, against
the measured device-to-device copy bandwidth; a prefill call is bound by FLOPs (2 M K N), against
the measured dense bf16 matmul rate. Before timing, each kernel's output is checked against the
reference (relative Frobenius error < 2e-2, bf16 activations).

    PYTHONPATH=. python benchmarks/quantized_matmul.py [--rows 1 16 64 512] [--formats int4 int8 q4_1 q8_0 fp8]
    PYTHONPATH=. python benchmarks/quantized_matmul.py --dry-run   # any backend: tiny shapes, kernels interpreted
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.moe import ceilings, median_seconds, relative_error
from pallas_kernels.block_matmul import block_matmul
from pallas_kernels.quantized_matmul import fp8_ops, ops, reference
from pallas_kernels.quantized_matmul.fp8_kernel import DECODE_ROWS

LAYERS = {"gate_up": (4096, 14336), "down": (14336, 4096)}
GROUP = 128
GGUF_BLOCK = 32
FORMATS = ("int4", "int8", "q4_1", "q8_0")


def weights(fmt: str, depth: int, width: int, seed: int) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    if fmt == "fp8":  # values [N, K], one scale per 128-wide K group and output column
        values = jnp.asarray(rng.standard_normal((width, depth), np.float32) * 100, jnp.float8_e4m3fn)
        return values, jnp.asarray(rng.random((depth // GROUP, width), np.float32) * 1e-3 + 1e-4)
    if fmt.startswith("q"):  # GGUF blocks: values, float16 scales (and Q4_1's float16 offsets)
        blocks = (depth // GGUF_BLOCK, width)
        scales = (rng.random(blocks, np.float32) * 0.01 + 1e-3).astype(np.float16)
        if fmt == "q8_0":
            return jnp.asarray(rng.integers(-127, 128, (depth, width), dtype=np.int8)), jnp.asarray(scales), None
        offsets = (-rng.random(blocks, np.float32) * 0.08).astype(np.float16)
        packed = rng.integers(0, 256, (depth // 2, width), dtype=np.uint8)
        return jnp.asarray(packed), jnp.asarray(scales), jnp.asarray(offsets)
    if fmt == "int4":
        q = rng.integers(0, 16, (depth, width), dtype=np.uint8)
        scales = (rng.random((depth // GROUP, width), np.float32) * 0.01 + 1e-3)
        zeros = rng.integers(0, 16, (depth // GROUP, width), dtype=np.uint8)
        return jnp.asarray(reference.pack_int4(q, GROUP)), jnp.asarray(scales), jnp.asarray(zeros)
    values = rng.integers(-127, 128, (depth, width), dtype=np.int8)
    return jnp.asarray(values), jnp.asarray((rng.random(width, np.float32) * 0.01).astype(np.float32))


def fp8_functions(interpret: bool) -> dict:
    def ours(x, *w):  # off GPU (--dry-run): the interpreted kernel where it applies, else the XLA FP8 path
        implementation = None if not interpret else "interpret" if x.shape[0] <= DECODE_ROWS else "xla"
        return fp8_ops.fp8_matmul(x, *w, implementation=implementation)

    return {
        "kernel": jax.jit(ours),
        "xla": jax.jit(lambda x, *w: fp8_ops.fp8_matmul(x, *w, implementation="reference")),
        "dense": jax.jit(lambda x, dense: jnp.dot(x, dense, preferred_element_type=jnp.float32).astype(x.dtype)),
    }


def functions(fmt: str, interpret: bool) -> dict:
    if fmt == "fp8":
        return fp8_functions(interpret)
    op = {"int4": ops.int4_matmul, "int8": ops.int8_matmul,
          "q4_1": lambda x, *w, **o: block_matmul(x, *w, bits=4, **o),
          "q8_0": lambda x, *w, **o: block_matmul(x, *w, bits=8, **o)}[fmt]
    kernel = "interpret" if interpret else "kernel"
    return {
        "kernel": jax.jit(lambda x, *w: op(x, *w, implementation=kernel)),
        "xla": jax.jit(lambda x, *w: op(x, *w, implementation="reference")),
        "dense": jax.jit(lambda x, dense: jnp.dot(x, dense, preferred_element_type=jnp.float32).astype(x.dtype)),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512])
    parser.add_argument("--formats", nargs="+", choices=(*FORMATS, "fp8"), default=list(FORMATS))
    parser.add_argument("--layers", nargs="+", choices=sorted(LAYERS), default=sorted(LAYERS))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true", help="K=N=256, kernels interpreted off GPU, one call each")
    parser.add_argument("--json", help="write every record to this file")
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.dry_run:
        raise SystemExit("the compiled kernels need an NVIDIA GPU; use --dry-run")
    iters, samples = (1, 1) if args.dry_run else (args.iters, args.samples)
    peak = ceilings(small=args.dry_run or not on_gpu)
    print(json.dumps(dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
                          dry_run=args.dry_run, **{k: float(f"{v:.4g}") for k, v in peak.items()})))
    records = []
    for fmt in args.formats:
        fns = functions(fmt, interpret=not on_gpu)
        for layer in args.layers:
            depth, width = (256, 256) if args.dry_run else LAYERS[layer]
            w = weights(fmt, depth, width, seed=depth)
            dense = jax.random.normal(jax.random.key(0), (depth, width), jnp.bfloat16) * depth**-0.5
            stored = sum(a.nbytes for a in w if a is not None)
            for rows in args.rows:
                xs = [jax.random.normal(jax.random.key(s), (rows, depth), jnp.bfloat16) for s in range(3)]
                error = relative_error(fns["kernel"](xs[0], *w), fns["xla"](xs[0], *w))
                assert error < 2e-2, f"{fmt} {layer} rows={rows}: relative error {error:.2e} vs the reference"
                io = 2 * rows * (depth + width)
                record = dict(format=fmt, layer=layer, rows=rows, depth=depth, width=width, error=error,
                              flops=2 * rows * depth * width)
                for name, fn in fns.items():
                    sets = [(x, dense) for x in xs] if name == "dense" else [(x, *w) for x in xs]
                    seconds, _ = median_seconds(fn, sets, iters=iters, samples=samples)
                    moved = (2 * depth * width if name == "dense" else stored) + io
                    record[name] = dict(ms=seconds * 1e3, gb_s=moved / seconds / 1e9,
                                        tflop_s=record["flops"] / seconds / 1e12)
                records.append(record)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    # "vs" columns are time(other) / time(ours): above 1 when ours is faster.
    print(f"\ncopy {peak['copy_gb_s']:.0f} GB/s, dense bf16 matmul {peak['matmul_tflop_s']:.1f} TFLOP/s (measured)\n")
    print("| format | layer | rows | ours ms | ours GB/s | ours TFLOP/s | vs XLA dequant+dot | vs dense bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['format']} | {r['layer']} | {r['rows']} | {r['kernel']['ms']:.3f} | {r['kernel']['gb_s']:.0f} | "
              f"{r['kernel']['tflop_s']:.1f} | {r['xla']['ms'] / r['kernel']['ms']:.2f} | "
              f"{r['dense']['ms'] / r['kernel']['ms']:.2f} |")
    return records


if __name__ == "__main__":
    main()
