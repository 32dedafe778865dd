"""The jitted sampler: one call turns a step's logits into next tokens for every sequence.

Per-request settings travel as arrays (`SamplingBatch`), so one compiled sampler
serves any mix of greedy and sampled requests. Order of operations (as vLLM):
penalties on the raw logits, then temperature, then top-k, top-p and min-p
filters, then a draw with the sequence's own key. Greedy rows take the argmax of
the penalised logits. Log-probabilities are those of the raw model distribution.

Glossary: S sequences in the step, V vocabulary, L penalty history length, N top logprobs.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

NO_TOKEN = -1


@struct.dataclass
class SamplingBatch:
    temperature: jax.Array  # [S] float32, 0 = greedy
    top_k: jax.Array  # [S] int32, 0 = off
    top_p: jax.Array  # [S] float32
    min_p: jax.Array  # [S] float32
    repetition_penalty: jax.Array  # [S] float32
    presence_penalty: jax.Array  # [S] float32
    frequency_penalty: jax.Array  # [S] float32
    seeds: jax.Array  # [S] uint32
    steps: jax.Array  # [S] int32: tokens generated so far (folds into the key)
    prompt_ids: jax.Array | None  # [S, Lp] int32 padded with NO_TOKEN (repetition penalty)
    output_ids: jax.Array | None  # [S, Lo] int32 padded with NO_TOKEN (all penalties)


# The per-sequence fields of a SamplingBatch with their dtypes, and a padding row's values.
ROW_COLUMNS = (
    ("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32), ("min_p", np.float32),
    ("repetition_penalty", np.float32), ("presence_penalty", np.float32), ("frequency_penalty", np.float32),
    ("seeds", np.uint32), ("steps", np.int32),
)
PAD_ROW = (0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 0, 0)


def sampling_row(*values: float) -> tuple:
    """One sequence's row in `ROW_COLUMNS` order, each value in its dtype (OverflowError if it does not fit)."""
    return tuple(dtype(value) for (_, dtype), value in zip(ROW_COLUMNS, values, strict=True))


def batch_from_rows(rows: list[tuple], num_rows: int, prompt_ids: np.ndarray | None, output_ids: np.ndarray | None) -> SamplingBatch:
    """The host-side batch of `rows`, padded with neutral rows to `num_rows`."""
    columns = zip(*(rows + [PAD_ROW] * (num_rows - len(rows))))
    arrays = {name: np.asarray(column, dtype) for (name, dtype), column in zip(ROW_COLUMNS, columns)}
    return SamplingBatch(**arrays, prompt_ids=prompt_ids, output_ids=output_ids)


def _token_counts(ids: jax.Array, vocab: int) -> jax.Array:
    """[S, L] ids (NO_TOKEN = none) -> [S, V] occurrence counts."""
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
    valid = ids != NO_TOKEN
    return jnp.zeros((ids.shape[0], vocab), jnp.int32).at[rows, jnp.where(valid, ids, 0)].add(valid.astype(jnp.int32))


def penalize(logits: jax.Array, seen: jax.Array, output_counts: jax.Array, batch: SamplingBatch) -> jax.Array:
    """Repetition (tokens `seen` in prompt or output), frequency and presence (output counts) penalties."""
    rep = batch.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - batch.frequency_penalty[:, None] * output_counts
    return logits - batch.presence_penalty[:, None] * (output_counts > 0)


def _history(batch: SamplingBatch, vocab: int) -> tuple[jax.Array, jax.Array]:
    """(seen in prompt or output, output counts), both [S, V], from the batch's id lists."""
    output_counts = _token_counts(batch.output_ids, vocab)
    return (_token_counts(batch.prompt_ids, vocab) + output_counts) > 0, output_counts


def apply_penalties(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    return penalize(logits, *_history(batch, logits.shape[-1]), batch)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Mask (to -inf) what top-k, then top-p, then min-p rule out; rows keep at least one token."""
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    ordered = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], ordered, -jnp.inf)

    # top-p: keep the smallest head of the sorted distribution whose mass reaches top_p.
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]) | (jnp.arange(vocab)[None, :] == 0)  # the top token always stays
    last_kept = jnp.take_along_axis(ordered, (jnp.sum(keep, axis=-1) - 1)[:, None], axis=-1)
    logits = jnp.where(logits < last_kept, -jnp.inf, logits)

    # min-p: drop tokens below min_p times the most likely token's probability.
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < threshold, -jnp.inf, logits)


def sequence_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """One PRNG key per sequence and step: reproducible whatever else shares the batch."""
    return jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(seeds, steps)


@struct.dataclass
class SampleOutput:
    tokens: jax.Array  # [S] int32
    logprobs: jax.Array | None  # [S] raw logprob of each chosen token (None: no row asked for logprobs)
    ranks: jax.Array | None  # [S] 1-based rank of each chosen token in the raw distribution
    top_ids: jax.Array | None  # [S, N]
    top_logprobs: jax.Array | None  # [S, N]


def _when(flag: bool | jax.Array, fn, operand: jax.Array) -> jax.Array:
    """`fn(operand)` if `flag`, else `operand`: decided when tracing for a Python bool, on the device otherwise."""
    if isinstance(flag, bool):
        return fn(operand) if flag else operand
    return jax.lax.cond(flag, fn, lambda x: x, operand)


def choose_tokens(
    logits: jax.Array,
    batch: SamplingBatch,
    penalties: tuple[jax.Array, jax.Array] | None,
    *,
    num_logprobs: int | None,
    use_sampling: bool | jax.Array,
    use_filters: bool | jax.Array,
) -> SampleOutput:
    """Next token of every row: penalties (`(seen, output_counts)`, or None), then greedy or drawn.

    `use_sampling`/`use_filters` skip the draw and the sort: at trace time when they are Python
    bools, at run time (`lax.cond`) when they are device booleans. `num_logprobs` None skips
    log-probabilities altogether.
    """
    raw = logits = logits.astype(jnp.float32)
    if penalties is not None:
        logits = penalize(logits, *penalties, batch)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(tokens: jax.Array) -> jax.Array:
        scaled = logits / jnp.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
        scaled = _when(use_filters, lambda s: filter_logits(s, batch.top_k, batch.top_p, batch.min_p), scaled)
        drawn = jax.vmap(jax.random.categorical)(sequence_keys(batch.seeds, batch.steps), scaled)
        return jnp.where(batch.temperature > 0, drawn, tokens).astype(jnp.int32)

    return with_logprobs(raw, _when(use_sampling, draw, greedy), num_logprobs)


def with_logprobs(raw: jax.Array, tokens: jax.Array, num_logprobs: int | None) -> SampleOutput:
    """`tokens` [S] with their log-probabilities under the raw logits [S, V] (None: skipped)."""
    if num_logprobs is None:
        return SampleOutput(tokens, None, None, None, None)
    raw_logprobs = jax.nn.log_softmax(raw, axis=-1)
    token_logprobs = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    ranks = jnp.sum(raw_logprobs > token_logprobs[:, None], axis=-1) + 1
    top_logprobs, top_ids = jax.lax.top_k(raw_logprobs, num_logprobs) if num_logprobs else (None, None)
    return SampleOutput(tokens, token_logprobs, ranks, top_ids, top_logprobs)


@partial(jax.jit, static_argnames=("num_logprobs", "use_penalties", "use_sampling", "use_filters"))
def sample(
    logits: jax.Array,
    batch: SamplingBatch,
    *,
    num_logprobs: int | None,
    use_penalties: bool,
    use_sampling: bool = True,
    use_filters: bool = True,
) -> SampleOutput:
    """Next token of every sequence of a host-built batch, with the log-probabilities asked for.

    The static flags drop work no row needs (all-greedy steps skip the draw,
    steps without top-k/top-p/min-p skip the sort); rows stay independent.
    """
    penalties = _history(batch, logits.shape[-1]) if use_penalties else None
    return choose_tokens(logits, batch, penalties, num_logprobs=num_logprobs, use_sampling=use_sampling,
                         use_filters=use_filters)
