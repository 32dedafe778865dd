"""DeepSeek-V3's (and GLM-4.5's) multi-token-prediction (MTP, "next-n") block run as a speculative draft.

The block (`CausalLM.mtp[0]`, loaded from `model.layers.{N}`) predicts the token after next from
the target's final normed hidden state `h_p` at position p and the embedding of token p + 1:

    x_p = eh_proj([enorm(embed(t_{p+1})); hnorm(h_p)])        [2E -> E]
    o_p = block(x_p)                                           one decoder layer (MLA or GQA, MoE), own KV
    logits = lm_head(shared_head.norm(o_p))                    predicts t_{p+2}

`embed` and `lm_head` are the target's (the checkpoint's copies in the block are not loaded), as in
transformers' `MtpModel`, which the tests compare against.

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
from model_lib.decoder import CausalLM, head_logits
from model_lib.layers import PagedBatch


class MTPDraft(nnx.Module):
    """The target's MTP block as a hidden-state-fed draft (`serving/spec_decode/hidden_draft.py`)."""

    def __init__(self, target: CausalLM):
        config = target.config
        if target.mtp is None:
            raise ValueError(f"the mtp method runs the MTP layers of DeepSeek-V3 and GLM-4.5 checkpoints; "
                             f"{config.architecture} at this checkpoint has none loaded (num_nextn_predict_layers = 0, "
                             "its tensors model.layers.N.* are absent, or the family does not load them)")
        if len(target.mtp) != 1:
            raise ValueError(f"the mtp method runs one MTP layer; this checkpoint holds {len(target.mtp)}")
        self.config = config
        self.block = target.mtp[0]
        self.embed_tokens = target.model.embed_tokens
        self.lm_head = target.lm_head  # None: tied to the embeddings
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
        x = block.eh_proj(jnp.concatenate([block.enorm(self.embed_tokens(input_ids)), block.hnorm(hidden)], axis=-1))
        return block(x, batch, kv_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`o [S, E]` -> float32 logits `[S, V]` over the target's vocabulary."""
        return head_logits(self.config, self.lm_head, self.embed_tokens, self.block.shared_head.norm(hidden))
