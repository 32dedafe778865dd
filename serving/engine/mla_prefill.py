"""Which sequences of a step attend in MLA's expanded form (`model_lib/layers/mla.py`).

MLA layers serve from latent pages. Decode rows attend absorbed; a long prefill chunk is
cheaper expanded (`pallas_kernels/paged_attention/latent_expanded.py`: it pays once a key
is read by more than `expanded_crossover` queries, about 171 at DeepSeek-V3's shape). The
host decides per step: the trailing run of sequences whose chunks each have at least
`min_tokens` new tokens goes expanded (a suffix, so the absorbed rows stay one token
range; the scheduler puts decode rows first and prefill chunks after them), and
`PagedBatch.expanded_from` names its first sequence. A step with such a run is a second
compiled variant of its shape; a step whose last chunk is short stays absorbed whole.

`EngineConfig.mla_expanded_prefill_tokens` sets `min_tokens`: None takes the crossover
of the model's shape, 0 keeps every step absorbed.
"""

from __future__ import annotations

import numpy as np

from model_lib.config import ModelConfig
from pallas_kernels.paged_attention import PagedMetadata
from pallas_kernels.paged_attention.latent_expanded import expanded_crossover


def expanded_prefill_tokens(config: ModelConfig, requested: int | None, max_num_batched_tokens: int) -> int:
    """New tokens a chunk needs to go expanded (0: never); ValueError for a value outside
    0..max_num_batched_tokens or for a model without MLA layers."""
    if config.attention_kind != "mla":
        if requested:
            raise ValueError(f"mla_expanded_prefill_tokens={requested}: {config.architecture} has no MLA layers")
        return 0
    if requested is None:
        return min(expanded_crossover(config.kv_lora_rank, config.qk_nope_head_dim, config.v_head_dim),
                   max_num_batched_tokens)
    if not 0 <= requested <= max_num_batched_tokens:
        raise ValueError(f"mla_expanded_prefill_tokens must be in [0, max_num_batched_tokens="
                         f"{max_num_batched_tokens}] (0: never expanded), got {requested}")
    return requested


def expanded_from(meta: PagedMetadata, min_tokens: int) -> int | None:
    """The first sequence of the step's trailing run of chunks with >= `min_tokens` new tokens (host
    arrays), or None when there is none (or `min_tokens` is 0)."""
    num_seqs = int(meta.num_seqs)
    if not min_tokens or not num_seqs:
        return None
    q_lens = np.diff(np.asarray(meta.cu_q_lens[: num_seqs + 1]))
    short = np.flatnonzero(q_lens < min_tokens)
    first = int(short[-1]) + 1 if short.size else 0
    return first if first < num_seqs else None
