"""The model runner: one jitted step over the ragged batch, KV cache donated.

Host-side, a step's sequences become flat arrays padded to bucket shapes, so
the number of compilations stays bounded: tokens pad to a power of two (at
most `max_num_batched_tokens`), the sequence axis pads to
min(token bucket, max_num_seqs), and the page-table width pads to a power of
two. Each new shape is logged once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib import CausalLM
from model_lib.layers import PagedBatch
from model_lib.sharding import ShardingPlan
from pallas_kernels.paged_attention import PagedMetadata
from serving.engine.scheduler import ScheduledSequence

logger = logging.getLogger(__name__)


def bucket(n: int, smallest: int, largest: int) -> int:
    """Smallest power of two >= n (and >= smallest), capped at `largest`."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest) if n <= largest else n


@dataclass
class StepInputs:
    """One step's host arrays, padded to bucket shapes."""

    input_ids: np.ndarray  # [T_pad]
    batch: PagedBatch  # numpy fields
    logits_indices: np.ndarray  # [S_pad] flat index of each sequence's last token


def _step(graphdef, state, kv_caches, input_ids, batch, logits_indices):
    model = nnx.merge(graphdef, state)
    return model.forward(input_ids, batch, kv_caches, logits_indices)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        *,
        num_pages: int,
        page_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        plan: ShardingPlan | None = None,
    ):
        config = model.config
        self.config = config
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_pages_per_seq = -(-max_model_len // page_size)
        # Layers stay unrolled: `model_lib.layer_scan.scanned_view` compiles in flat time against depth,
        # but its scan copies each layer's whole KV pool in and out per step (RESULTS.md), so it waits
        # for an attention op that takes the stacked pool and a layer index.
        self.graphdef, self.state = nnx.split(model)
        sharding_fn = plan.sharding if plan is not None else None
        self.kv_caches = model.make_kv_caches(num_pages, page_size, jnp.dtype(config.dtype), sharding_fn)
        self.kv_cache_bytes = sum(a.nbytes for a in jax.tree.leaves(self.kv_caches))
        self._step = jax.jit(partial(_step, self.graphdef), donate_argnums=(1,))
        self.compiled_shapes: set[tuple[int, int, int]] = set()

    def prepare(self, scheduled: list[ScheduledSequence]) -> StepInputs:
        num_tokens = sum(item.num_new_tokens for item in scheduled)
        token_pad = bucket(num_tokens, 1, self.max_num_batched_tokens)
        seq_pad = min(token_pad, bucket(len(scheduled), 1, self.max_num_seqs))
        page_pad = bucket(max(len(item.seq.pages) for item in scheduled), 1, self.max_pages_per_seq)

        input_ids = np.zeros(token_pad, np.int32)
        positions = np.zeros(token_pad, np.int32)
        seq_lens = np.zeros(token_pad, np.int32)
        cu_q_lens = np.zeros(seq_pad + 1, np.int32)
        kv_lens = np.zeros(seq_pad, np.int32)
        page_tables = np.zeros((seq_pad, page_pad), np.int32)
        logits_indices = np.zeros(seq_pad, np.int32)
        offset = 0
        for i, item in enumerate(scheduled):
            seq, n = item.seq, item.num_new_tokens
            start, end = seq.num_computed, seq.num_computed + n
            input_ids[offset : offset + n] = seq.token_slice(start, end)
            positions[offset : offset + n] = np.arange(start, end)
            seq_lens[offset : offset + n] = end
            kv_lens[i] = end
            page_tables[i, : len(seq.pages)] = seq.pages
            offset += n
            cu_q_lens[i + 1] = offset
            logits_indices[i] = offset - 1
        cu_q_lens[len(scheduled) + 1 :] = offset
        meta = PagedMetadata(cu_q_lens, kv_lens, page_tables, np.int32(len(scheduled)))
        batch = PagedBatch(positions=positions, seq_lens=seq_lens, meta=meta)
        return StepInputs(input_ids, batch, logits_indices)

    def execute(self, scheduled: list[ScheduledSequence]) -> jax.Array:
        """Run one step; logits `[S_pad, V]`, row i for `scheduled[i]` (left on the device)."""
        inputs = self.prepare(scheduled)
        shape = (inputs.input_ids.shape[0], inputs.logits_indices.shape[0], inputs.batch.meta.page_tables.shape[1])
        start = time.perf_counter()
        logits, self.kv_caches = self._step(
            self.state, self.kv_caches, inputs.input_ids, inputs.batch, inputs.logits_indices
        )
        if shape not in self.compiled_shapes:
            self.compiled_shapes.add(shape)
            logits.block_until_ready()
            logger.info(
                "compiled step for tokens=%d seqs=%d pages/seq=%d in %.1fs (%d shapes so far)",
                *shape, time.perf_counter() - start, len(self.compiled_shapes),
            )
        return logits
