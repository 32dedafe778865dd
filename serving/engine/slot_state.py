"""Per-sequence sampling state that lives on the device, one row per batch slot.

A running sequence holds a slot (`Sequence.slot`, given by the scheduler). Its row
is written once when it joins the running batch (`write_rows`, and `write_counts`
for a sequence with penalties), then only the sampler touches it: each step that
completes the sequence advances its step counter (the PRNG fold-in), adds the
sampled token to its counts and records it in `last_tokens`, from which the next
step takes its input on the device. Nothing is rebuilt per step on the host.

Count rows hold output-token occurrences, plus `PROMPT_BIT` on the prompt's tokens
(the repetition penalty looks at both; frequency and presence at the output only).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from serving.engine.sampler import PAD_ROW, ROW_COLUMNS, SampleOutput, SamplingBatch, choose_tokens
from serving.structured.bitmask import apply_token_bitmask

PROMPT_BIT = 1 << 30  # above any output count max_model_len allows (validated in `new_slot_state`)


@struct.dataclass
class SlotState:
    params: SamplingBatch  # [M] columns; prompt_ids and output_ids unused (None)
    counts: jax.Array  # [M, V] int32: output occurrences + PROMPT_BIT for prompt tokens


def new_slot_state(num_slots: int, vocab: int, max_model_len: int) -> SlotState:
    if max_model_len >= PROMPT_BIT:
        raise ValueError(f"max_model_len must be below {PROMPT_BIT} for the penalty counts")
    columns = {name: jnp.full((num_slots,), value, dtype) for (name, dtype), value in zip(ROW_COLUMNS, PAD_ROW)}
    return SlotState(SamplingBatch(**columns, prompt_ids=None, output_ids=None), jnp.zeros((num_slots, vocab), jnp.int32))


def count_row(prompt_ids: list[int], output_ids: list[int], vocab: int) -> np.ndarray:
    """A sequence's count row (host side), written when it joins with penalties."""
    row = np.bincount(np.asarray(output_ids, np.int64), minlength=vocab).astype(np.int32)
    prompt = np.asarray(prompt_ids, np.int64)
    row[prompt[prompt < vocab]] |= PROMPT_BIT  # placeholders past the output vocabulary (Mllama's) are never sampled
    return row


@partial(jax.jit, donate_argnums=(0,))
def write_rows(state: SlotState, slots: jax.Array, rows: SamplingBatch) -> SlotState:
    """Set the parameter rows of `slots` (slot index M, out of range, pads and is dropped)."""
    params = jax.tree.map(lambda column, new: column.at[slots].set(new, mode="drop"), state.params, rows)
    return state.replace(params=params)


@partial(jax.jit, donate_argnums=(0,))
def write_counts(state: SlotState, slot: jax.Array, row: jax.Array) -> SlotState:
    return state.replace(counts=state.counts.at[slot].set(row))


@partial(jax.jit, static_argnames=("num_logprobs", "use_penalties"), donate_argnums=(1,))
def sample_slots(
    logits: jax.Array,
    state: SlotState,
    last_tokens: jax.Array,
    slots: jax.Array,
    completes: jax.Array,
    bitmask: jax.Array | None = None,
    *,
    num_logprobs: int | None,
    use_penalties: bool,
) -> tuple[SampleOutput, SlotState, jax.Array]:
    """Sample row i of `logits` with slot `slots[i]`'s parameters; advance the slots where `completes`.

    Rows that do not complete a sequence (prefill chunks, padding) are sampled as greedy and
    leave no trace. Whether any row draws or filters is decided on the device, so one compiled
    sampler serves every mix of requests. `bitmask` [S, W] (structured output, `serving/structured/
    bitmask.py`) forbids tokens per row before anything else, log-probabilities included (as vLLM);
    the engine always passes one (all ones when no row has a grammar, kept on the device), so the
    same compiled sampler serves constrained and free steps; None compiles a variant without it.
    Returns the sample, the new state and `last_tokens` [M].
    """
    if bitmask is not None:
        logits = apply_token_bitmask(logits.astype(jnp.float32), bitmask)
    num_slots = last_tokens.shape[0]
    batch = jax.tree.map(lambda column: jnp.take(column, slots, axis=0, mode="clip"), state.params)
    temperature = jnp.where(completes, batch.temperature, 0.0)
    batch = batch.replace(temperature=temperature)
    drawn = temperature > 0
    filtered = drawn & ((batch.top_k > 0) | (batch.top_p < 1) | (batch.min_p > 0))
    penalties = None
    if use_penalties:
        counts = jnp.take(state.counts, slots, axis=0, mode="clip")
        penalties = (counts != 0, counts & (PROMPT_BIT - 1))
    out = choose_tokens(logits, batch, penalties, num_logprobs=num_logprobs, use_sampling=jnp.any(drawn),
                        use_filters=jnp.any(filtered))
    advanced = jnp.where(completes, slots, num_slots)  # out of range: dropped
    params = state.params.replace(steps=state.params.steps.at[advanced].add(1, mode="drop"))
    counts = state.counts.at[advanced, out.tokens].add(1, mode="drop") if use_penalties else state.counts
    last_tokens = last_tokens.at[advanced].set(out.tokens, mode="drop")
    return out, SlotState(params, counts), last_tokens
