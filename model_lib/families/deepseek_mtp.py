"""DeepSeek-V3's multi-token-prediction (MTP, "next-n") block run as a speculative draft.

The block (`CausalLM.mtp[0]`, loaded from `model.layers.{N}`) predicts the token after next from
the target's final normed hidden state `h_p` at position p and the embedding of token p + 1:

    x_p = eh_proj([enorm(embed(t_{p+1})); hnorm(h_p)])        [2E -> E]
    o_p = block(x_p)                                           one decoder layer (MLA + MoE), own KV
    logits = shared_head.head(shared_head.norm(o_p))           predicts t_{p+2}

For deeper drafts the block runs again on its own output `o_p` in place of `h_p` (vLLM's
recursion: DeepSeek-V3 ships one block). Unlike vLLM we do not zero the embedding at position 0,
the published formula has no such term.

Glossary: T tokens, E hidden, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.cache_spec import PoolSizes
from model_lib.decoder import CausalLM
from model_lib.layers import PagedBatch


class MTPDraft(nnx.Module):
    """The target's MTP block as a hidden-state-fed draft (`serving/spec_decode/hidden_draft.py`)."""

    def __init__(self, target: CausalLM):
        config = target.config
        if target.mtp is None:
            raise ValueError(f"the mtp method needs MTP layers; {config.architecture} at this checkpoint holds none "
                             "(num_nextn_predict_layers = 0, or its tensors model.layers.N.* are absent)")
        if len(target.mtp) != 1:
            raise ValueError(f"the mtp method runs one MTP layer; this checkpoint holds {len(target.mtp)}")
        self.config = config
        self.block = target.mtp[0]
        self.hidden_size = config.hidden_size

    def capture_layers(self) -> tuple[int, ...]:
        """What the target hands over: its final normed hidden state."""
        return (self.config.num_layers,)

    def make_kv_cache(self, num_pages: int, page_size: int, dtype: jnp.dtype):
        spec = self.config.layer_cache_spec(self.config.num_layers - 1)  # the block has the last layer's kinds
        return spec.allocate(PoolSizes(num_pages, page_size, 1), dtype)

    def __call__(self, input_ids: jax.Array, hidden: jax.Array, batch: PagedBatch, kv_cache,
                 from_target: bool) -> tuple[jax.Array, object]:
        """Next tokens `[T]` and hidden states `[T, E]` (the target's or the block's own) -> `o [T, E]`, KV."""
        block = self.block
        x = block.eh_proj(jnp.concatenate([block.enorm(block.embed_tokens(input_ids)), block.hnorm(hidden)], axis=-1))
        return block(x, batch, kv_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`o [S, E]` -> float32 logits `[S, V]` over the target's vocabulary."""
        head = self.block.shared_head
        return head.head(head.norm(hidden)).astype(jnp.float32)
