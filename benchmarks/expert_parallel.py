"""Expert parallelism on 8 simulated CPU devices: partial sums vs all-to-all dispatch, in one run.

One MoE block forward (router, dispatch, gated experts, combine) at a few token counts,
unsharded and under `model_lib.parallel` with each `expert_parallel` strategy on a mesh
(default: the `ep` preset, expert 4 x tensor 2). Times are medians of `--samples` calls
(after a compile and a warm-up call) and are reported against the unsharded forward of the
same process. Communication is read off the optimized HLO: the bytes of every collective's
result (all-reduce, all-to-all, all-gather, reduce-scatter, collective-permute) per device
and forward. The outputs of both strategies are checked against the unsharded block.

    python -m benchmarks.expert_parallel [--tokens 16 128 1024] [--mesh expert=4,tensor=2]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from model_lib.config import ModelConfig  # noqa: E402
from model_lib.layers.moe import MoE  # noqa: E402
from model_lib.parallel import kernel_plan  # noqa: E402
from model_lib.sharding import EXPERT_PARALLEL, ShardingPlan, make_mesh, shard_model  # noqa: E402

COLLECTIVES = ("all-reduce", "all-to-all", "all-gather", "reduce-scatter", "collective-permute")
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes of each collective's results in optimized HLO text (per device; tuples summed)."""
    totals = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo.splitlines():
        for op in COLLECTIVES:
            match = re.search(rf"= (.*?) {op}(-start)?\(", line)
            if match:
                for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
                    totals[op] += BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return {op: n for op, n in totals.items() if n}


def moe_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        architecture="MixtralForCausalLM", family="mixtral", vocab_size=64, hidden_size=args.hidden,
        intermediate_size=args.width, num_layers=1, num_heads=8, num_kv_heads=8, head_dim=args.hidden // 8,
        max_position_embeddings=64, layer_types=("full_attention",), num_experts=args.experts,
        num_experts_per_tok=args.top_k, moe_intermediate_size=args.width, moe_layers=(True,), initializer_range=0.05,
    )


def forward(plan: ShardingPlan | None):
    @nnx.jit
    def run(moe, x):
        with kernel_plan(plan):
            return moe(x)

    return run


def measure(run, moe, x, samples: int) -> tuple[float, np.ndarray, dict[str, int]]:
    hlo = run.lower(moe, x).compile().as_text() if hasattr(run, "lower") else ""
    out = np.asarray(run(moe, x))  # compile + first call
    run(moe, x).block_until_ready()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        run(moe, x).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out, collective_bytes(hlo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 1024])
    parser.add_argument("--mesh", default="expert=4,tensor=2", help="mesh axis sizes, e.g. expert=8")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()

    sizes = {k: int(v) for k, v in (part.split("=") for part in args.mesh.split(","))}
    plan = ShardingPlan(make_mesh(sizes))
    config = moe_config(args)
    base = MoE(config, rngs=nnx.Rngs(0))
    sharded = shard_model(MoE(config, rngs=nnx.Rngs(0)), plan)
    print(f"jax {jax.__version__}, {jax.device_count()} devices, mesh {dict(plan.mesh.shape)}, hidden {args.hidden}, "
          f"expert width {args.width}, {args.experts} experts, top-{args.top_k}, float32")
    print("| tokens | unsharded ms | psum ms | vs unsharded | all_to_all ms | vs unsharded | psum comm KiB/device "
          "| all_to_all comm KiB/device |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        x = jax.numpy.asarray(np.random.RandomState(tokens).randn(tokens, args.hidden), jax.numpy.float32)
        reference_ms, expected, _ = measure(forward(None), base, x, args.samples)
        row, comm = [], []
        for strategy in EXPERT_PARALLEL:
            strategy_plan = dataclasses.replace(plan, expert_parallel=strategy)
            seconds, out, volume = measure(forward(strategy_plan), sharded, x, args.samples)
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
            row += [f"{seconds * 1e3:.2f}", f"{seconds / reference_ms:.2f}x"]
            comm.append(" + ".join(f"{op} {n / 1024:.1f}" for op, n in volume.items()) or "0")
        print(f"| {tokens} | {reference_ms * 1e3:.2f} | {' | '.join(row)} | {' | '.join(comm)} |")


if __name__ == "__main__":
    main()
