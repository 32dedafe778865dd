"""Exact verification of drafts: k + 1 target rows per sequence in, accepted tokens out.

Row j of sequence i holds the target's logits after its known tokens and drafts 0..j-1. Each
row is processed as the plain sampler would process it (penalties counting the drafts before it
as generated, temperature, top-k/top-p/min-p), giving the target distribution p. Draft j is
accepted with probability min(1, p(d)/q(d)), q the distribution it was drawn from (a point mass
for n-gram drafts); the first rejected row draws from (p - q)+ renormalised, and when every
draft is accepted the row after the last one draws a bonus token from p. The output is then
distributed exactly as the target's (Leviathan et al., 2023). Greedy rows accept a draft iff it
is the target's argmax and end with the argmax: token for token what plain decoding gives.
With structured output each row is first masked by its grammar row (the grammar after the
drafts before it), so p is the constrained distribution plain structured decoding samples from.

Glossary: S sequences, K drafts per sequence (P = K + 1 rows), V vocabulary, R proposal rows.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from serving.engine.sampler import SampleOutput, _when, filter_logits, penalize, sequence_keys, with_logprobs
from serving.engine.slot_state import PROMPT_BIT, SlotState
from serving.structured.bitmask import apply_token_bitmask

# Independent random streams per (sequence, position): the acceptance test, the residual draw, the draft's draw.
ACCEPT_STREAM, RESAMPLE_STREAM, DRAFT_STREAM = 1, 2, 3


def stream_keys(seeds: jax.Array, steps: jax.Array, stream: int) -> jax.Array:
    """One key per row for one of the streams above."""
    return jax.vmap(lambda key: jax.random.fold_in(key, stream))(sequence_keys(seeds, steps))


def _penalized(raw: jax.Array, counts: jax.Array, drafts: jax.Array, valid: jax.Array, rows) -> jax.Array:
    """Penalties per row, the drafts before a row counted as generated tokens. raw [S*P, V]."""
    num_seqs, num_drafts = drafts.shape
    vocab = raw.shape[-1]
    onehot = jax.nn.one_hot(drafts, vocab, dtype=jnp.int32) * valid[:, :num_drafts, None]  # [S, K, V]
    before = jnp.concatenate([jnp.zeros((num_seqs, 1, vocab), jnp.int32), jnp.cumsum(onehot, axis=1)], axis=1)
    output_counts = ((counts & (PROMPT_BIT - 1))[:, None, :] + before).reshape(-1, vocab)
    seen = ((counts != 0)[:, None, :] | (before > 0)).reshape(-1, vocab)
    return penalize(raw, seen, output_counts, rows)


@partial(jax.jit, static_argnames=("num_logprobs", "use_penalties"), donate_argnums=(1,))
def verify(
    logits: jax.Array,
    state: SlotState,
    last_tokens: jax.Array,
    slots: jax.Array,
    completes: jax.Array,
    drafts: jax.Array,
    num_drafts: jax.Array,
    draft_probs: jax.Array | None,
    draft_rows: jax.Array,
    bitmask: jax.Array | None = None,
    *,
    num_logprobs: int | None,
    use_penalties: bool,
) -> tuple[SampleOutput, jax.Array, SlotState, jax.Array]:
    """Accept or reject the drafts of every sequence; advance the slots where `completes`.

    logits [S*P, V]; drafts [S, K] int32 with `num_drafts` [S] valid; draft_probs [R, K, V]
    (sequence i's at row `draft_rows[i]`) or None for point-mass drafts; `bitmask` [S*P, W] the
    grammar rows (structured output, all ones where free; None compiles a variant without it),
    applied before anything else, so accepted and drawn tokens keep to the grammar. Returns the chosen
    tokens flattened [S*P] (row i*P + j: sequence i's j-th new token; the first
    `num_accepted[i] + 1` are its output), with log-probabilities if asked; `num_accepted` [S];
    the new slot state and `last_tokens` [M].
    """
    num_seqs, num_k = drafts.shape
    width = num_k + 1
    vocab = logits.shape[-1]
    num_slots = last_tokens.shape[0]
    batch = jax.tree.map(lambda column: jnp.take(column, slots, axis=0, mode="clip"), state.params)
    batch = batch.replace(temperature=jnp.where(completes, batch.temperature, 0.0))
    rows = jax.tree.map(lambda column: jnp.repeat(column, width, axis=0), batch)
    position = jnp.tile(jnp.arange(width, dtype=jnp.int32), num_seqs)
    rows = rows.replace(steps=rows.steps + position)  # each row draws with the key of its output position

    padded = jnp.concatenate([drafts, jnp.zeros((num_seqs, 1), jnp.int32)], axis=1)  # [S, P]
    valid = jnp.arange(width)[None, :] < num_drafts[:, None]  # [S, P]: row j has a draft to test
    draft = padded.reshape(-1)
    raw = logits.astype(jnp.float32)
    if bitmask is not None:
        raw = apply_token_bitmask(raw, bitmask)
    target = raw
    if use_penalties:
        counts = jnp.take(state.counts, slots, axis=0, mode="clip")
        target = _penalized(raw, counts, drafts, valid, rows)
    greedy = jnp.argmax(target, axis=-1).astype(jnp.int32)
    drawn = rows.temperature > 0
    filtered = drawn & ((rows.top_k > 0) | (rows.top_p < 1) | (rows.min_p > 0))

    def draw(_) -> tuple[jax.Array, jax.Array]:
        scaled = target / jnp.where(drawn, rows.temperature, 1.0)[:, None]
        scaled = _when(jnp.any(filtered), lambda s: filter_logits(s, rows.top_k, rows.top_p, rows.min_p), scaled)
        p = jax.nn.softmax(scaled, axis=-1)
        p_draft = jnp.take_along_axis(p, draft[:, None], axis=-1)[:, 0]
        if draft_probs is None:  # point masses: q(d) = 1, (p - q)+ is p without d
            q_draft = jnp.ones_like(p_draft)
            residual = jnp.where(jnp.arange(vocab)[None, :] == draft[:, None], 0.0, p)
        else:
            q = jnp.take(draft_probs, draft_rows, axis=0, mode="clip").astype(jnp.float32)  # [S, K, V]
            q = jnp.concatenate([q, jnp.zeros((num_seqs, 1, vocab), jnp.float32)], axis=1).reshape(-1, vocab)
            q_draft = jnp.take_along_axis(q, draft[:, None], axis=-1)[:, 0]
            residual = jnp.maximum(p - q, 0.0)
        # A row without a draft (the bonus row) draws from p itself; so does a residual with no mass
        # left (p <= q everywhere: then the draft was accepted for sure and the row is never used).
        residual = jnp.where(valid.reshape(-1)[:, None] & (residual.sum(-1, keepdims=True) > 0), residual, p)
        u = jax.vmap(jax.random.uniform)(stream_keys(rows.seeds, rows.steps, ACCEPT_STREAM))
        accept = u * q_draft < p_draft  # u < p(d) / q(d)
        resampled = jax.vmap(jax.random.categorical)(stream_keys(rows.seeds, rows.steps, RESAMPLE_STREAM),
                                                     jnp.log(residual))
        return jnp.where(drawn, accept, draft == greedy), jnp.where(drawn, resampled, greedy).astype(jnp.int32)

    accept, chosen = jax.lax.cond(jnp.any(drawn), draw, lambda _: (draft == greedy, greedy), None)
    accept = accept.reshape(num_seqs, width) & valid
    num_accepted = jnp.sum(jnp.cumprod(accept[:, :num_k].astype(jnp.int32), axis=1), axis=1)
    num_accepted = jnp.where(completes, num_accepted, 0)
    column = jnp.arange(width)[None, :]
    tokens = jnp.where(column < num_accepted[:, None], padded, chosen.reshape(num_seqs, width))
    out = with_logprobs(raw, tokens.reshape(-1), num_logprobs)

    advanced = jnp.where(completes, slots, num_slots)  # out of range: dropped
    params = state.params.replace(steps=state.params.steps.at[advanced].add(num_accepted + 1, mode="drop"))
    counts = state.counts
    if use_penalties:
        kept = completes[:, None] & (column <= num_accepted[:, None])
        counts = counts.at[jnp.where(kept, slots[:, None], num_slots), tokens].add(1, mode="drop")
    last = jnp.take_along_axis(tokens, num_accepted[:, None], axis=1)[:, 0]
    last_tokens = last_tokens.at[advanced].set(last, mode="drop")
    return out, num_accepted, SlotState(params, counts), last_tokens
