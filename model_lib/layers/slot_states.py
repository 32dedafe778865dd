"""Per-sequence rows of `RecurrentState` pools for one ragged serving step.

A recurrent layer serving a flat `PagedBatch` reads each sequence's row of its pools
(`[num_slots, ...]`, or `[L, num_slots, ...]` in a scanned stack at row `batch.layer`), runs its
tokens from there, and writes the states after them back:

- a sequence whose chunk starts at position 0 (new, or recomputed after preemption) starts
  from zeros, whatever its row holds;
- a sequence without a token this step (padding rows, which name the scratch row) leaves its
  row as it was.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model_lib.layers.attention import PagedBatch


def _per_sequence(flags: jax.Array, array: jax.Array) -> jax.Array:
    """`[S]` flags broadcast against `[S, ...]`."""
    return flags.reshape((-1,) + (1,) * (array.ndim - 1))


def _index(batch: PagedBatch) -> tuple[jax.Array, ...]:
    if batch.slots is None:
        raise ValueError("a recurrent layer serves only batches that name each sequence's slot (PagedBatch.slots)")
    return (batch.slots,) if batch.layer is None else (batch.layer, batch.slots)


def read_states(pools: tuple[jax.Array, ...], batch: PagedBatch) -> tuple[jax.Array, ...]:
    """Each sequence's row of every pool, `[S, ...]` (zeros for sequences starting at position 0)."""
    meta = batch.meta
    fresh = meta.kv_lens == meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]
    rows = tuple(pool[_index(batch)] for pool in pools)
    return tuple(jnp.where(_per_sequence(fresh, row), 0.0, row).astype(row.dtype) for row in rows)


def write_states(pools: tuple[jax.Array, ...], batch: PagedBatch, states: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """The pools with each sequence that had tokens this step holding its new states (`[S, ...]` each)."""
    index = _index(batch)
    stepped = batch.meta.cu_q_lens[1:] > batch.meta.cu_q_lens[:-1]
    return tuple(
        pool.at[index].set(jnp.where(_per_sequence(stepped, state), state.astype(pool.dtype), pool[index]))
        for pool, state in zip(pools, states)
    )
