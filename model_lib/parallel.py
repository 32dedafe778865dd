"""Kernels under `shard_map`: attention split by heads (and dense attention by batch rows), the MoE
experts split by expert and width.

A jitted step that runs on a mesh activates its `ShardingPlan` with `kernel_plan(plan)`
inside the traced function; the kernel call sites (`attend`, for paged and dense batches,
and the MoE block) then run their custom calls per device on local shards, so XLA never
gathers a KV cache, q/k/v or an expert stack around them. Mesh axes come from the plan's
logical-axis rules (`q_heads`, `kv_heads`, `expert`, `mlp`, `batch`); no model code names one.
Without an active plan (or on a mesh that shards none of these axes) everything runs as before.

Attention: query heads split over the `q_heads` axes; kv heads split the same way, or,
when there are fewer kv heads than devices, each device keeps the whole (replicated)
cache, writes every head into it, and attends with the one kv head its query heads use
(addressed in place, as a stacked pool's layer is: `reference.layer_pages`).
Dense (training) attention also splits its batch rows over the `batch` axes (data, fsdp).

Experts, split over the `expert` axes and their width over the `mlp` axes, as
`ShardingPlan.expert_parallel` (a mesh preset's `expert_parallel:`) says. "psum" (the
default): tokens stay where they are, each expert shard runs its experts on every
(token, expert) pair routed to them, and the partial outputs are summed over the expert
and width axes (one width shard adds the output biases). "all_to_all": tokens split over
the expert axes, pairs travel to their expert's shard and back in worst-case-sized
buffers (no token is dropped), and the token slices are gathered again. The notes in
benchmarks/RESULTS.md ("Expert parallelism") give the measurements behind the default.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from model_lib.sharding import ShardingPlan
from pallas_kernels.flash_attention import attention as flash_attention
from pallas_kernels.paged_attention import PagedMetadata, attend_rows, ragged_paged_attention, write_kv
from pallas_kernels.paged_attention.kv_quant import Pages, page_values

_PLAN: contextvars.ContextVar[ShardingPlan | None] = contextvars.ContextVar("kernel_plan", default=None)


@contextlib.contextmanager
def kernel_plan(plan: ShardingPlan | None) -> Iterator[None]:
    """Run the kernels traced in this block under `shard_map` on `plan`'s mesh (None: unsharded)."""
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def active_plan() -> ShardingPlan | None:
    return _PLAN.get()


def _mesh_axes(plan: ShardingPlan, *logical: str) -> tuple[str, ...]:
    """Mesh axes (size > 1) that the rules give any of these logical axes, in mesh order."""
    named = {a for name in logical for a in plan.rules.get(name, ()) or ()}
    return tuple(a for a in plan.mesh.axis_names if a in named and plan.mesh.shape[a] > 1)


def _only(spec: PartitionSpec, axes: Sequence[str]) -> PartitionSpec:
    """`spec` keeping only mesh `axes` (the others are gathered before the call)."""
    kept = []
    for entry in spec:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(a for a in names if a in axes)
        kept.append(names or None)
    return PartitionSpec(*kept)


def _spec_axes(spec: PartitionSpec) -> tuple[str, ...]:
    return tuple(a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry))


def _shard_map(fn: Callable, plan: ShardingPlan, in_specs: Any, out_specs: Any) -> Callable:
    # No replication checking: the kernels' platform-dependent dispatch and Pallas calls carry no
    # varying-axis types; every out spec here is replicated only where the body makes it so.
    return jax.shard_map(fn, mesh=plan.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _heads_group(plan: ShardingPlan, q_axes: tuple[str, ...], kv_axes: tuple[str, ...], kv_heads: int) -> int:
    """Query-head shards per kv head when the kv heads are replicated (shard i uses kv head i // group)."""
    if kv_axes and kv_axes != q_axes:
        raise ValueError(f"query heads split over {q_axes} but kv heads over {kv_axes}; both need the same axes")
    return math.prod(plan.mesh.shape[a] for a in q_axes) // kv_heads


def _own_kv_head(arrays: Sequence[jax.Array], q_axes: tuple[str, ...], group: int, axis: int) -> list[jax.Array]:
    """Inside shard_map, with replicated kv heads: the one kv head this shard's query heads use."""
    head = jax.lax.axis_index(q_axes) // group
    return [jax.lax.dynamic_slice_in_dim(a, head, 1, axis=axis) for a in arrays]


# -- dense attention (training, scoring) ------------------------------------------------------------


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    **options: Any,
) -> jax.Array:
    """`flash_attention.attention` (q `[B, T, H, D]`, k/v `[B, S, K, D]`), per batch and head shard.

    Rows split over the `batch` axes (data, fsdp) where they divide, heads over the `q_heads` /
    `kv_heads` axes as the parameters are; replicated kv heads as in `paged_attention`.
    """
    plan = active_plan()
    axes = () if plan is None else _mesh_axes(plan, "batch", "q_heads", "kv_heads")
    q_spec = PartitionSpec() if not axes else _only(plan.partition_spec(("batch", None, "q_heads", None), q.shape), axes)
    if not _spec_axes(q_spec):
        return flash_attention(q, k, v, q_positions=q_positions, kv_positions=kv_positions,
                               q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, **options)
    q_axes = _spec_axes(PartitionSpec(q_spec[2]))
    kv_spec = PartitionSpec(q_spec[0], None, *_only(plan.partition_spec(("kv_heads", None), k.shape[2:]), q_axes))
    kv_axes = _spec_axes(PartitionSpec(kv_spec[2]))
    group = _heads_group(plan, q_axes, kv_axes, k.shape[2]) if q_axes else 1
    rows_spec = PartitionSpec(q_spec[0], None)
    per_head = {name: options.pop(name) for name in ("sinks", "alibi_slopes") if options.get(name) is not None}
    visible_until = options.pop("visible_until", None)  # [B, T] rows, like the positions

    def local(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, visible_until, per_head):
        if q_axes and not kv_axes:
            k, v = _own_kv_head((k, v), q_axes, group, axis=2)
        return flash_attention(q, k, v, q_positions=q_positions, kv_positions=kv_positions,
                               q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, visible_until=visible_until,
                               **options, **per_head)

    per_head_specs = {name: PartitionSpec(q_spec[2]) for name in per_head}
    in_specs = (q_spec, kv_spec, kv_spec, rows_spec, rows_spec, rows_spec, rows_spec, rows_spec, per_head_specs)
    run = _shard_map(local, plan, in_specs, q_spec)
    return run(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, visible_until, per_head)


# -- paged attention ----------------------------------------------------------------------------


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array | None,
    k_cache: Pages,
    v_cache: Pages | None,
    meta: PagedMetadata,
    *,
    layer: jax.Array | int | None = None,
    implementation: str | None = None,
    attend_meta: PagedMetadata | None = None,
    **options: Any,
) -> tuple[jax.Array, Pages, Pages | None]:
    """`ragged_paged_attention` (q `[T, H, D]`, k/v `[T, K, D]`, caches `[K, P, S, D]` or stacked
    `[K, L, P, S, D]` with `layer`, `attend_meta` for the rows that attend), per head shard.

    Quantized caches (`QuantizedPages`) split their scales `[K, (L,) P, S]` on kv heads like their values.
    Latent pages (`value_dim`, `v` and `v_cache` None) have one kv head: replicated, read by every shard.
    """
    plan = active_plan()
    axes = () if plan is None else _mesh_axes(plan, "q_heads", "kv_heads")
    q_spec = PartitionSpec() if not axes else _only(plan.partition_spec((None, "q_heads", None), q.shape), axes)
    q_axes = _spec_axes(q_spec)
    if not q_axes:
        return ragged_paged_attention(q, k, v, k_cache, v_cache, meta, layer=layer, implementation=implementation,
                                      attend_meta=attend_meta, **options)
    kv_spec = _only(plan.partition_spec((None, "kv_heads", None), k.shape), axes)
    values = page_values(k_cache)
    cache_axes = ("kv_heads",) + (None,) * (values.ndim - 1)
    cache_spec = _only(plan.partition_spec(cache_axes, values.shape), axes)
    kv_axes = _spec_axes(cache_spec)
    group = _heads_group(plan, q_axes, kv_axes, values.shape[0])
    per_head = {name: options.pop(name) for name in ("sinks", "alibi_slopes") if options.get(name) is not None}
    layer = None if layer is None else jnp.asarray(layer, jnp.int32)

    def local(q, k, v, k_cache, v_cache, meta, per_head, layer, attend_meta):
        k_cache, v_cache = write_kv(k, v, k_cache, v_cache, meta, layer)
        head = None if kv_axes else jax.lax.axis_index(q_axes) // group
        out = attend_rows(q, k_cache, v_cache, meta, attend_meta, layer=layer, head=head,
                          implementation=implementation, **options, **per_head)
        return out, k_cache, v_cache

    per_head_specs = {name: PartitionSpec(q_spec[1]) for name in per_head}
    cache_specs = jax.tree.map(lambda c: PartitionSpec(*cache_spec[: c.ndim]), k_cache)  # scales: the values' spec
    v_specs = (kv_spec, cache_specs) if v is not None else (PartitionSpec(), PartitionSpec())  # a prefix of None
    in_specs = (q_spec, kv_spec, v_specs[0], cache_specs, v_specs[1], PartitionSpec(), per_head_specs, PartitionSpec(),
                PartitionSpec())
    run = _shard_map(local, plan, in_specs, (q_spec, cache_specs, v_specs[1]))
    return run(q, k, v, k_cache, v_cache, meta, per_head, layer, attend_meta)


# -- mixture of experts -------------------------------------------------------------------------


def routed_experts(
    experts: nnx.Module,
    tokens: jax.Array,
    ids: jax.Array,
    weights: jax.Array,
    apply_experts: Callable[..., jax.Array],
    combine: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """Tokens `[T, E]` through their routed experts (`ids`, `weights` `[T, k]`): float32 `[T, E]`.

    `apply_experts(experts, tokens, rows, keys, lead_shard)` and `combine(pair_outputs, weights)`
    are the MoE block's dispatch and combine; here they run on each device's shard of the experts.
    """
    plan = active_plan()
    k = ids.shape[-1]
    rows = jnp.arange(ids.size, dtype=jnp.int32) // k
    if plan is None:
        return combine(apply_experts(experts, tokens, rows, ids.reshape(-1)), weights)
    strategy = plan.expert_parallel
    # Only the parameters cross into shard_map; the rest (e.g. nnx.capture's storage) is closed over.
    graphdef, state, rest = nnx.split(experts, nnx.Param, ...)
    axes = _mesh_axes(plan, "expert", "mlp")
    specs = jax.tree.map(lambda v: _only(plan.variable_sharding(v, v.shape).spec, axes), state,
                         is_leaf=lambda v: isinstance(v, nnx.Variable))
    kernel = experts.gate_proj.kernel
    kernel_spec = _only(plan.partition_spec(kernel.get_metadata()["logical_axes"], kernel.shape), axes)
    expert_axes = _spec_axes(PartitionSpec(kernel_spec[0]))
    width_axes = _spec_axes(PartitionSpec(kernel_spec[2]))
    used = set(expert_axes + width_axes)
    if not used:
        return combine(apply_experts(experts, tokens, rows, ids.reshape(-1)), weights)
    free = [a for a in plan.mesh.axis_names if a not in used]
    if strategy == "all_to_all" and expert_axes:  # whole token slices per (batch shard, expert shard)
        batch_axes = tuple(a for a in _mesh_axes(plan, "batch") if a in free)
        pad = -tokens.shape[0] % math.prod(plan.mesh.shape[a] for a in expert_axes + batch_axes)
        tokens, ids, weights = (jnp.pad(a, ((0, pad), (0, 0))) for a in (tokens, ids, weights))
    token_spec = _only(plan.partition_spec(("batch", None), tokens.shape), free)
    partial_axes = tuple(a for a in plan.mesh.axis_names if a in used)

    def shard(state):
        """This device's experts, its first global expert id, and whether it adds the output bias."""
        local = nnx.merge(graphdef, state, rest)
        first = jax.lax.axis_index(expert_axes) * local.num_experts if expert_axes else 0
        lead = jax.lax.axis_index(width_axes) == 0 if width_axes else True
        return local, first, lead

    def psum(state, tokens, ids, weights):
        local, first, lead = shard(state)
        keys = ids.reshape(-1) - first
        keys = jnp.where((keys >= 0) & (keys < local.num_experts), keys, local.num_experts)
        rows = jnp.arange(keys.shape[0], dtype=jnp.int32) // k
        return jax.lax.psum(combine(apply_experts(local, tokens, rows, keys, lead), weights), partial_axes)

    def all_to_all(state, tokens, ids, weights):
        local, first, lead = shard(state)
        per_shard = local.num_experts
        shards = math.prod(plan.mesh.shape[a] for a in expert_axes)
        n = tokens.shape[0] // shards  # this shard's slice of the (padded) tokens
        start = jax.lax.axis_index(expert_axes) * n
        mine, my_ids, my_weights = (jax.lax.dynamic_slice_in_dim(a, start, n, axis=0) for a in (tokens, ids, weights))
        flat = my_ids.reshape(-1)  # [m], m = n * k pairs
        m = flat.shape[0]
        dest = flat // per_shard
        order = jnp.argsort(flat, stable=True)
        sorted_dest = dest[order]
        counts = jnp.bincount(dest, length=shards)
        slot = sorted_dest * m + jnp.arange(m) - (jnp.cumsum(counts) - counts)[sorted_dest]
        # Worst-case buffers (every pair may go to one shard): nothing is dropped.
        send = jnp.zeros((shards * m, mine.shape[1]), mine.dtype).at[slot].set(mine[order // k])
        send_keys = jnp.full((shards * m,), per_shard, flat.dtype).at[slot].set(flat[order] - sorted_dest * per_shard)
        received = jax.lax.all_to_all(send, expert_axes, 0, 0, tiled=True)
        received_keys = jax.lax.all_to_all(send_keys, expert_axes, 0, 0, tiled=True)
        y = apply_experts(local, received, jnp.arange(shards * m, dtype=jnp.int32), received_keys, lead)
        back = jax.lax.all_to_all(y, expert_axes, 0, 0, tiled=True)
        pairs = jnp.zeros((m, y.shape[1]), y.dtype).at[order].set(back[slot])
        out = combine(pairs, my_weights)
        if width_axes:
            out = jax.lax.psum(out, width_axes)
        return jax.lax.all_gather(out, expert_axes, axis=0, tiled=True)

    body = all_to_all if strategy == "all_to_all" and expert_axes else psum
    run = _shard_map(body, plan, (specs, token_spec, token_spec, token_spec), token_spec)
    return run(state, tokens, ids, weights)[: rows.shape[0] // k]
