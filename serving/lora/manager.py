"""Adapter slots of a multi-LoRA server: PEFT folders loaded into per-layer `[max_loras, ...]` stacks.

Every linear layer but the output head and MLA's `kv_b_proj` (folded into the attention weights,
`model_lib/layers/mla.py`, so a per-token adapter cannot reach it) gets `A [max_loras, in, R]` and `B [max_loras, R, out]`
stacks (R = max_lora_rank rounded up to 16, the grouped matmul kernel's tile; a smaller rank is
zero-padded, which adds nothing to the product). An adapter loaded into slot s writes its
`A` and `scale * B` (`alpha / r`, or `alpha / sqrt(r)` under rsLoRA) into row s of every stack
(zeros in the layers it does not target), as new arrays of the same shapes: the jitted step takes
the stacks as arguments, so loading and unloading never recompile it.

Slots and requests: a request holds its adapter's slot from `acquire` to `release`. Unloading
an adapter removes its name at once (new requests for it are refused), but its slot, and so its
weights, stay until the last request using it is released; only then can another adapter take
the slot. Prefix-cache keys of a request with an adapter are salted with the adapter's load
(`cache_salt`, new at every load), so KV pages are only shared between requests that ran the
same weights.

All methods are for the engine's thread (the one that runs steps).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib.layers.linear import Linear
from model_lib.layers.lora_slots import LoRAStack, adapter_slots
from model_lib.layers.mla import absorbed_projections
from model_lib.lora import is_output_head, linear_layers, read_peft_adapter

logger = logging.getLogger(__name__)

MAX_LORAS_LIMIT = 64
MAX_LORA_RANK_LIMIT = 512
RANK_MULTIPLE = 16  # pallas_kernels.triton_tiles.MIN_BLOCK: the grouped matmul kernel tiles R by 16

Stacks = list[tuple[jax.Array, jax.Array]]  # per served layer: (A [L, in, R], B [L, R, out])


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    path: str
    slot: int
    rank: int
    int_id: int
    cache_salt: int  # salts its requests' prefix-cache keys (unique per load)


def served_layers(model: nnx.Module) -> dict[str, Linear]:
    """Our path -> linear layer, for the layers that get adapter stacks (all but the output head and MLA's
    kv_b_proj)."""
    absorbed = absorbed_projections(model)
    return {path: layer for path, layer in linear_layers(model).items()
            if not is_output_head(path) and path not in absorbed}


def _write_slot(stacks: Stacks, slot: jax.Array, values: Stacks) -> Stacks:
    return [(a.at[slot].set(va), b.at[slot].set(vb)) for (a, b), (va, vb) in zip(stacks, values)]


class LoRAManager:
    def __init__(self, model: nnx.Module, *, max_loras: int, max_lora_rank: int):
        if not 1 <= max_loras <= MAX_LORAS_LIMIT:
            raise ValueError(f"max_loras must be in [1, {MAX_LORAS_LIMIT}], got {max_loras}")
        if not 1 <= max_lora_rank <= MAX_LORA_RANK_LIMIT:
            raise ValueError(f"max_lora_rank must be in [1, {MAX_LORA_RANK_LIMIT}], got {max_lora_rank}")
        self.model = model
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.width = -(-max_lora_rank // RANK_MULTIPLE) * RANK_MULTIPLE
        self.layers = served_layers(model)
        self.paths = tuple(self.layers)
        self.dtype = jnp.dtype(model.config.dtype)
        self.stacks: Stacks = [
            (jnp.zeros((max_loras, layer.in_features, self.width), self.dtype),
             jnp.zeros((max_loras, self.width, layer.out_features), self.dtype))
            for layer in self.layers.values()
        ]
        self.adapters: dict[str, LoadedAdapter] = {}
        self._free = list(range(max_loras - 1, -1, -1))  # popped from the end: slot 0 first
        self._users = [0] * max_loras
        self._retired: set[int] = set()  # unloaded while requests still use them
        self._salts = itertools.count(1)
        self._write = jax.jit(_write_slot)

    @property
    def stack_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.stacks)

    def _slot_values(self, path: str, weights: dict[str, tuple[np.ndarray, np.ndarray]], scale: float):
        layer = self.layers[path]
        a = np.zeros((layer.in_features, self.width), np.float32)
        b = np.zeros((self.width, layer.out_features), np.float32)
        if path in weights:
            wa, wb = weights[path]
            a[:, : wa.shape[1]] = wa
            b[: wb.shape[0]] = wb * scale
        return a.astype(self.dtype), b.astype(self.dtype)

    def load(self, name: str, path: str | Path, int_id: int | None = None) -> LoadedAdapter:
        """Read a PEFT adapter folder into a free slot; ValueError / FileNotFoundError naming the problem."""
        if not name:
            raise ValueError("an adapter needs a name")
        if name in self.adapters:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
        config, weights = read_peft_adapter(self.model, path)
        if config.r > self.max_lora_rank:
            raise ValueError(f"adapter {name!r} has rank {config.r}, above max_lora_rank={self.max_lora_rank}")
        unserved = sorted(set(weights) - set(self.layers))
        if unserved:
            raise ValueError(f"adapter {name!r} targets {unserved}, which served adapters do not support "
                             f"(every linear layer but the output head and MLA's kv_b_proj)")
        if not self._free:
            raise ValueError(f"all max_loras={self.max_loras} adapter slots are taken "
                             f"({', '.join(sorted(self.adapters)) or 'by unloaded adapters still in use'}); "
                             "unload one first")
        values = [self._slot_values(p, weights, config.scale) for p in self.paths]
        slot = self._free.pop()
        try:
            self.stacks = self._write(self.stacks, np.int32(slot), values)
        except BaseException:
            self._free.append(slot)
            raise
        adapter = LoadedAdapter(name, str(path), slot, config.r, int_id if int_id is not None else slot + 1,
                                next(self._salts))
        self.adapters[name] = adapter
        logger.info("loaded LoRA adapter %r (rank %d, %d layers) from %s into slot %d", name, config.r,
                    len(weights), path, slot)
        return adapter

    def unload(self, name: str) -> None:
        """Forget `name` now; its slot is freed once no request uses it (KeyError if not loaded)."""
        if name not in self.adapters:
            raise KeyError(f"no LoRA adapter named {name!r} is loaded")
        slot = self.adapters.pop(name).slot
        if self._users[slot]:
            self._retired.add(slot)
        else:
            self._free.append(slot)
        logger.info("unloaded LoRA adapter %r (slot %d, %d requests still on it)", name, slot, self._users[slot])

    def acquire(self, name: str) -> LoadedAdapter:
        """The adapter for a new request, its slot held until `release` (ValueError if not loaded)."""
        adapter = self.adapters.get(name)
        if adapter is None:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded")
        self._users[adapter.slot] += 1
        return adapter

    def release(self, slot: int) -> None:
        self._users[slot] -= 1
        if self._users[slot] == 0 and slot in self._retired:
            self._retired.remove(slot)
            self._free.append(slot)

    def users(self, slot: int) -> int:
        return self._users[slot]


@contextlib.contextmanager
def adapters_in_step(model: nnx.Module, paths: Sequence[str], lora: tuple[Stacks, jax.Array] | None) -> Iterator[None]:
    """Inside a traced step: give the layers their stacks and the tokens their slots (no-op for None)."""
    if lora is None:
        yield
        return
    stacks, slots = lora
    layers = linear_layers(model)
    for path, (a, b) in zip(paths, stacks):
        layers[path].lora_stack_a, layers[path].lora_stack_b = LoRAStack(a), LoRAStack(b)
    with adapter_slots(slots):
        yield
