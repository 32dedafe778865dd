"""What each layer keeps while serving (DESIGN.md "Serving state: one cache spec per layer").

A layer declares one spec (`ModelConfig.layer_cache_spec`) or None. Each spec allocates its own pool and
says what it costs, so the runner and the engine need no branch per kind:

- `PagedKV`: K and V pages per kv head, `[K, P, B, D]` each; grows with the tokens a sequence holds.
- `LatentKV`: one page of `dim` values per token shared by all heads (MLA), `[1, P, B, dim]`.
- `RecurrentState`: fixed-size arrays per sequence (SSM, RG-LRU, conv tails), one row per engine slot,
  `[num_slots, *shape]`; the last slot is the padding rows' scratch. Pages cannot rebuild it, so a model
  holding one serves without prefix caching.
- `CrossKV`: an encoder's keys and values for one cross-attention layer, one row of `max_len` positions per
  engine slot (`[num_slots, max_len, K, D]` each, and each slot's encoder length), written once when the
  encoder runs for the sequence (an encoder-decoder's text encoder; Whisper's audio or Mllama's image
  encoder fill it the same way). Its rows belong to the slot: finishing, aborting or preempting a
  sequence frees them with the slot, and a recomputed sequence runs its encoder again. The decoder's
  self-attention KV depends on the encoder input, so a model holding one serves without prefix caching.
  With `segments` (Mllama: one per image) the rows split into that many equal parts, and a
  `[num_slots, segments, 3]` int32 pool says per slot and part which query positions `[start, end)` see
  it and how many of its leading rows are real.
- `LayerSpecs`: several of the above in one layer (a decoder layer's `PagedKV` and `CrossKV`).

A `LayerScan` segment (`model_lib.layer_scan`) stacks `repeats` layers of the same spec: paged pools gain
the layer axis after the head axis (`[K, L, P, B, D]`), recurrent pools in front (`[L, num_slots, ...]`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_attention.kv_quant import bytes_per_token, empty_pages

ShardingFn = Callable[[tuple, tuple], jax.sharding.Sharding] | None


@dataclass(frozen=True)
class PoolSizes:
    """What a pool is allocated for: pages of `page_size` tokens and engine slots (`max_num_seqs + 1`)."""

    num_pages: int
    page_size: int
    num_slots: int


@dataclass(frozen=True)
class PagedKV:
    """K and V pages of `kv_heads` heads of `head_dim` values."""

    kv_heads: int
    head_dim: int
    prefix_cacheable = True

    def page_bytes(self, page_size: int, dtype: Any) -> int:
        return 2 * self.kv_heads * page_size * bytes_per_token(self.head_dim, dtype)

    def fixed_bytes(self, num_slots: int) -> int:
        return 0

    def allocate(self, sizes: PoolSizes, dtype: Any, sharding_fn: ShardingFn = None, repeats: int | None = None):
        """`(k, v)` pools `[K, P, B, D]` (`[K, repeats, P, B, D]` stacked); int8/float8 -> `QuantizedPages`."""
        shape, axes = _paged_shape(self.kv_heads, self.head_dim, sizes, repeats)
        return empty_pages(shape, axes, dtype, sharding_fn), empty_pages(shape, axes, dtype, sharding_fn)


@dataclass(frozen=True)
class LatentKV:
    """One page of `dim` values per token shared by every head (MLA: kv_lora_rank + qk_rope_head_dim)."""

    dim: int
    prefix_cacheable = True

    def page_bytes(self, page_size: int, dtype: Any) -> int:
        return page_size * bytes_per_token(self.dim, dtype)

    def fixed_bytes(self, num_slots: int) -> int:
        return 0

    def allocate(self, sizes: PoolSizes, dtype: Any, sharding_fn: ShardingFn = None, repeats: int | None = None):
        """One pool `[1, P, B, dim]` (`[1, repeats, P, B, dim]` stacked), replicated over the tensor axis."""
        shape, _ = _paged_shape(1, self.dim, sizes, repeats)
        return empty_pages(shape, (None,) * len(shape), dtype, sharding_fn)


@dataclass(frozen=True)
class RecurrentState:
    """Fixed-size per-sequence state arrays of `shapes` (float32 unless `dtype` says otherwise).

    `axes` optionally names each shape's logical axes (e.g. heads over the tensor axis); None replicates.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtype: str = "float32"
    axes: tuple[tuple[str | None, ...], ...] | None = None
    prefix_cacheable = False

    def __post_init__(self):
        if self.axes is not None and [len(a) for a in self.axes] != [len(s) for s in self.shapes]:
            raise ValueError(f"RecurrentState axes {self.axes} do not match shapes {self.shapes}")

    def page_bytes(self, page_size: int, dtype: Any) -> int:
        return 0

    def fixed_bytes(self, num_slots: int) -> int:
        itemsize = jnp.dtype(self.dtype).itemsize
        return num_slots * itemsize * sum(int(np.prod(s)) for s in self.shapes)

    def allocate(self, sizes: PoolSizes, dtype: Any = None, sharding_fn: ShardingFn = None,
                 repeats: int | None = None) -> tuple[jax.Array, ...]:
        """Zeroed `[num_slots, *shape]` per shape (`[repeats, num_slots, *shape]` stacked); the KV dtype is
        not used: states keep their own precision."""
        pools = []
        for i, shape in enumerate(self.shapes):
            axes = (None, *(self.axes[i] if self.axes else (None,) * len(shape)))
            full = (sizes.num_slots, *shape)
            if repeats is not None:
                full, axes = (repeats, *full), (None, *axes)
            device = None if sharding_fn is None else sharding_fn(axes, full)
            pools.append(jnp.zeros(full, self.dtype, device=device))
        return tuple(pools)


@dataclass(frozen=True)
class CrossKV:
    """Encoder keys and values of `kv_heads` heads of `head_dim`, up to `max_len` positions per slot (split
    into `segments` equal parts, each with the query positions that see it, when `segments` > 0)."""

    kv_heads: int
    head_dim: int
    max_len: int
    dtype: str = "float32"  # the model's: encoder outputs are not quantized like pages
    segments: int = 0
    prefix_cacheable = False

    def __post_init__(self):
        if self.segments and self.max_len % self.segments:
            raise ValueError(f"CrossKV max_len {self.max_len} does not split into {self.segments} equal segments")

    def page_bytes(self, page_size: int, dtype: Any) -> int:
        return 0

    def fixed_bytes(self, num_slots: int) -> int:
        per_slot = 2 * self.max_len * self.kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize + 4
        return num_slots * (per_slot + 12 * self.segments)

    def allocate(self, sizes: PoolSizes, dtype: Any = None, sharding_fn: ShardingFn = None,
                 repeats: int | None = None) -> tuple[jax.Array, ...]:
        """Zeroed `(k, v)` pools `[num_slots, max_len, K, D]` and lengths `[num_slots]` (int32); with segments,
        also their `[num_slots, segments, 3]` (start, end, real rows), int32."""
        if repeats is not None:
            raise ValueError("CrossKV pools are not stacked for scanned layers")
        shape = (sizes.num_slots, self.max_len, self.kv_heads, self.head_dim)
        device = None if sharding_fn is None else sharding_fn((None, None, "kv_heads", None), shape)
        lengths = jnp.zeros((sizes.num_slots,), jnp.int32)
        pools = (jnp.zeros(shape, self.dtype, device=device), jnp.zeros(shape, self.dtype, device=device), lengths)
        return pools + (jnp.zeros((sizes.num_slots, self.segments, 3), jnp.int32),) * (self.segments > 0)


@dataclass(frozen=True)
class LayerSpecs:
    """The states of a layer that keeps more than one (allocated as a tuple, in order)."""

    parts: tuple[Any, ...]

    @property
    def prefix_cacheable(self) -> bool:
        return all(part.prefix_cacheable for part in self.parts)

    def page_bytes(self, page_size: int, dtype: Any) -> int:
        return sum(part.page_bytes(page_size, dtype) for part in self.parts)

    def fixed_bytes(self, num_slots: int) -> int:
        return sum(part.fixed_bytes(num_slots) for part in self.parts)

    def allocate(self, sizes: PoolSizes, dtype: Any, sharding_fn: ShardingFn = None, repeats: int | None = None):
        return tuple(part.allocate(sizes, dtype, sharding_fn, repeats) for part in self.parts)


CacheSpec = PagedKV | LatentKV | RecurrentState | CrossKV | LayerSpecs


def _paged_shape(heads: int, dim: int, sizes: PoolSizes, repeats: int | None):
    shape, axes = (heads, sizes.num_pages, sizes.page_size, dim), ("kv_heads", None, None, None)
    if repeats is not None:
        shape, axes = (heads, repeats, *shape[1:]), ("kv_heads", None, *axes[1:])
    return shape, axes


def cache_specs(config: Any) -> list[CacheSpec | None]:
    """Every layer's spec, in order (`config` is a `ModelConfig`)."""
    return [config.layer_cache_spec(layer) for layer in range(config.num_layers)]


def page_bytes(specs: list[CacheSpec | None], page_size: int, dtype: Any) -> int:
    """Bytes one page index costs over all layers (the paged kinds)."""
    return sum(spec.page_bytes(page_size, dtype) for spec in specs if spec is not None)


def fixed_bytes(specs: list[CacheSpec | None], num_slots: int) -> int:
    """Bytes of the per-slot pools, whatever the number of pages."""
    return sum(spec.fixed_bytes(num_slots) for spec in specs if spec is not None)


def prefix_cacheable(specs: list[CacheSpec | None]) -> bool:
    """Whether pages alone hold every layer's state for a prefix (so prefix caching is sound)."""
    return all(spec.prefix_cacheable for spec in specs if spec is not None)
