"""Grouped (ragged) matmul in plain jnp: the definition of correct and the CPU path.

Glossary: M rows (tokens x top-k, padded to a static size), K contraction dim,
N output dim, G groups (experts).

`grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G] int32) -> [M, N]`:
the rows of lhs are sorted by group; rows `[start_g, start_g + group_sizes[g])`
(with `start_g = sum(group_sizes[:g])`) are multiplied by `rhs[g]`. Rows at or past
`sum(group_sizes)` (<= M) come out as zeros. Products accumulate in float32 and
the result has lhs's dtype. This is `jax.lax.ragged_dot`.

`transposed_grouped_matmul(lhs [M, K], rhs [M, N], group_sizes) -> [G, K, N]`
(tgmm) is the weight gradient of the above: `out[g] = lhs_g^T @ rhs_g` over the
rows of group g; a group without rows gives zeros.

Two forms of each: the `jax.lax.ragged_dot` one (the CPU path, and what the
kernel is compared with) and a dense per-group loop (mask the group's rows, one
dense matmul per group: G times the FLOPs, but nothing ragged to trust).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_bounds(group_sizes: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """(start, end) row of each group; sizes are clipped so that no group reaches past `num_rows`."""
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), num_rows).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`jax.lax.ragged_dot` with float32 accumulation; `[M, N]` in lhs's dtype."""
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def grouped_matmul_dense(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The same product as one masked dense matmul per group; `[M, N]` in lhs's dtype."""
    num_rows = lhs.shape[0]
    starts, ends = group_bounds(group_sizes, num_rows)
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    out = jnp.zeros((num_rows, rhs.shape[2]), jnp.float32)
    for g in range(rhs.shape[0]):
        mine = (rows >= starts[g]) & (rows < ends[g])
        masked = jnp.where(mine[:, None], lhs, jnp.zeros_like(lhs))
        out = out + jnp.dot(masked, rhs[g], preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def transposed_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`out[g] = lhs_g^T @ rhs_g` per group as masked dense matmuls; `[G, K, N]` in lhs's dtype."""
    num_rows = lhs.shape[0]
    starts, ends = group_bounds(group_sizes, num_rows)
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    mine = (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])  # [G, M]
    masked = jnp.where(mine[:, :, None], lhs[None], jnp.zeros_like(lhs)[None])  # [G, M, K]
    rhs = jnp.where((rows < ends[-1])[:, None], rhs, jnp.zeros_like(rhs))  # rows past the groups may hold anything
    out = jnp.einsum("gmk,mn->gkn", masked, rhs, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)
