"""Serving view of a decoder: runs of structurally identical layers go through one `lax.scan`.

With the layers unrolled, a jitted step's compile time grows with depth (30 copies
of the same block for SmolLM2). `scanned_view(model)` returns a model for serving
whose `model.layers` holds segments instead of layers: a `LayerScan` for each run
of repeated blocks (a block is `period` consecutive layers, so Gemma 2's
local/global alternation scans as blocks of two), and the plain `DecoderLayer`
where a layer matches neither neighbour (DeciLM's heterogeneous stacks). Two
layers match when their graph definitions (every static setting: window, rotary,
sublayer kinds) and their parameter shapes, dtypes and shardings agree.

The parameter tree that loading, export, LoRA, quantization, sharding and the
trainer see is untouched: only the view stacks the layer parameters (leading
axis = repeats), once, at serving start. The KV caches follow the segments:
`CausalLM.make_kv_caches` builds them from whichever layout the model has, a
segment's pools stacked `[K, repeats, P, B, D]` (kv heads stay the leading, sharded
axis).

The serving runner steps through this view (by default on accelerators). The stacked
pools are the scan's carry, and the paged attention op writes and reads the running
layer's pages of them in place (`PagedBatch.layer`;
`pallas_kernels.paged_attention.reference.layer_pages`): with the pools as scanned
inputs and outputs instead, XLA:CPU copied every layer's whole pool in and out of the
loop body on every step. What the loop body still copies is each layer's weights,
sliced out of the stack before its matmuls (XLA:CPU fuses no dynamic slice into a
dot): on the CPU the scanned step measured up to 1.4x slower than the unrolled one, so
the CPU backend serves unrolled by default (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MAX_PERIOD = 4  # longest repeating block looked for (Gemma 2: 2; Gemma 3: local x5 + global is left unrolled)


class LayerScan(nnx.Module):
    """`repeats` copies of a block of `period` layers, parameters stacked on a leading axis.

    Called like one layer, `(x, batch, cache) -> (x, cache)`, where `cache` is a tuple
    with one entry per layer of the block: its `(k, v)` pools stacked `[K, repeats, P, B, D]`,
    or None for a layer without a KV cache. The pools ride in the scan's carry and each
    layer reads and writes its own pages in place (the `PagedBatch.layer` index), so
    XLA updates the donated buffers instead of copying a layer's pool in and out.
    """

    def __init__(self, layers: list[nnx.Module], period: int):
        self.period = period
        self.repeats = len(layers) // period
        self.block = nnx.List([stack_modules(layers[j::period]) for j in range(period)])

    @property
    def num_layers(self) -> int:
        return self.period * self.repeats

    def __call__(self, x: jax.Array, batch, cache: tuple | None = None):
        graphdefs, states = zip(*(nnx.split(layer) for layer in self.block))
        caches = (None,) * self.period if cache is None else tuple(cache)

        def body(carry, slices):
            x, caches = carry
            layer_states, index = slices
            layer_batch = batch if cache is None else batch.replace(layer=index)
            new_caches = []
            for graphdef, state, layer_cache in zip(graphdefs, layer_states, caches):
                x, layer_cache = nnx.merge(graphdef, state)(x, layer_batch, layer_cache)
                new_caches.append(layer_cache)
            return (x, tuple(new_caches)), None

        (x, caches), _ = jax.lax.scan(body, (x, caches), (states, jnp.arange(self.repeats, dtype=jnp.int32)))
        return x, (None if cache is None else caches)


def stack_arrays(arrays: list[jax.Array]) -> jax.Array:
    """Stack same-shaped arrays on a new leading axis, keeping a named sharding (unsplit leading axis).

    Shape-only leaves (`jax.ShapeDtypeStruct`, from `nnx.eval_shape`) stack to a shape-only leaf.
    """
    def stack(*xs):
        return jnp.stack(xs)

    if isinstance(arrays[0], jax.ShapeDtypeStruct):
        return jax.eval_shape(stack, *arrays)
    sharding = arrays[0].sharding
    if isinstance(sharding, NamedSharding):
        return jax.jit(stack, out_shardings=NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec)))(*arrays)
    return stack(*arrays)


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """One module of the shared structure whose variables hold every module's values stacked."""
    graphdef = nnx.graphdef(modules[0])
    states = [nnx.state(module) for module in modules]
    return nnx.merge(graphdef, jax.tree.map(lambda *leaves: stack_arrays(list(leaves)), *states))


def structure_key(layer: nnx.Module):
    """What must agree for two layers to share one scanned body."""
    graphdef, state = nnx.split(layer)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return graphdef, tuple((path, a.shape, a.dtype, getattr(a.sharding, "spec", None)) for path, a in leaves)


def plan_segments(keys: list, max_period: int = MAX_PERIOD) -> list[tuple[int, int, int]]:
    """Cut layers (by structure key) into segments `(start, period, repeats)`, fewest segments first.

    For each period, a greedy walk takes a block that repeats at least twice as one
    scanned segment and a lone layer otherwise; the period giving fewest segments wins
    (ties: the shorter period).
    """
    best = None
    for period in range(1, max_period + 1):
        segments, start = [], 0
        while start < len(keys):
            block = keys[start : start + period]
            repeats = 1
            while keys[start + repeats * period : start + (repeats + 1) * period] == block:
                repeats += 1
            if len(block) == period and repeats >= 2:
                segments.append((start, period, repeats))
                start += period * repeats
            else:
                segments.append((start, 1, 1))
                start += 1
        if best is None or len(segments) < len(best):
            best = segments
    return best


def scanned_view(model: nnx.Module) -> nnx.Module:
    """A serving copy of `model` whose layer stack runs as scanned segments (see the module docstring).

    The copy shares every non-layer parameter with `model`; the scanned segments hold
    stacked copies of their layers. A model with no repeated layers comes back as is. The first
    `model.unrolled_layers` layers (if it says so) are never scanned.
    """
    # Layers whose output the model changes between layers (DeepStack) stay unrolled: their keys are unique.
    unrolled = getattr(model, "unrolled_layers", 0)
    segments = plan_segments([("unrolled", i) if i < unrolled else structure_key(layer)
                              for i, layer in enumerate(model.model.layers)])
    if all(repeats == 1 for _, _, repeats in segments):
        return model
    view = nnx.merge(*nnx.split(model))  # shares the arrays; its layer list is replaced below
    layers = list(view.model.layers)
    view.model.layers = nnx.List([
        layers[start] if repeats == 1 else LayerScan(layers[start : start + period * repeats], period)
        for start, period, repeats in segments
    ])
    return view


def segment_layers(model: nnx.Module) -> list[tuple[int, int, int]]:
    """`(first layer, period, repeats)` of each entry of `model.model.layers` (plain layers: `(i, 1, 1)`)."""
    segments, start = [], 0
    for entry in model.model.layers:
        if isinstance(entry, LayerScan):
            segments.append((start, entry.period, entry.repeats))
            start += entry.num_layers
        else:
            segments.append((start, 1, 1))
            start += 1
    return segments
