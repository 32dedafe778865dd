"""Explicit in/out shardings of the jitted serving step on a mesh.

Parameters stay where the sharding plan put them (anything left off the mesh is
replicated on it), KV caches stay where they were allocated (split on kv heads, or
replicated when there are fewer kv heads than the tensor size), and the step's host
inputs and its logits are replicated: every device runs every token, and the
sampler reads whole rows of logits. The cache shardings are read off the cache
pytree itself, whatever its structure.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding

from model_lib.sharding import ShardingPlan


def _on_mesh(plan: ShardingPlan, tree: Any) -> Any:
    """Each array's sharding where it already lies on the plan's mesh, else replicated on it."""

    def keep(x: Any) -> NamedSharding:
        sharding = getattr(x, "sharding", None)
        return sharding if isinstance(sharding, NamedSharding) and sharding.mesh == plan.mesh else plan.replicated()

    return jax.tree.map(keep, tree)


def place_serving_step(
    plan: ShardingPlan | None, state: Any, kv_caches: Any, *, num_host_inputs: int
) -> tuple[Any, dict[str, Any]]:
    """(`state` on the mesh, the `jax.jit` keyword arguments of a step `(state, kv_caches, *host_inputs)`
    that returns `(logits, kv_caches)`)."""
    if plan is None:
        return state, {}
    state_shardings, cache_shardings = _on_mesh(plan, state), _on_mesh(plan, kv_caches)
    if all(isinstance(x, jax.Array) for x in jax.tree.leaves(state)):
        state = jax.device_put(state, state_shardings)
    replicated = plan.replicated()
    return state, dict(
        in_shardings=(state_shardings, cache_shardings, *[replicated] * num_host_inputs),
        out_shardings=(replicated, cache_shardings),
    )
