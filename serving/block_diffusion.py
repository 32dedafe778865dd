"""Block diffusion decoding (SDAR): fill the sequence a block of `block_size` tokens at a time.

The math of JetAstra/SDAR's `generate.py` (`block_diffusion_generate`), batched: each row
appends blocks of `mask_token_id`; a block (the first one holding the prompt's tail, if
the prompt does not end on a block boundary) is denoised in passes in which it sees every
earlier block and all of itself (the model's block-causal attention). A pass predicts
every position of the block and commits some of the still-masked ones: `denoising_steps`
passes commit `block_size // denoising_steps` each (the remainder spread over the first
passes), chosen by `remasking_strategy`:
- "low_confidence_static": the most confident predictions;
- "low_confidence_dynamic": every prediction above `confidence_threshold` when there are at
  least that many, else the most confident;
- "sequential": the leftmost masked positions.
When no mask is left the block is committed; a row stops after the block that holds a stop
token (EOS or `stop_token_ids`) or once `max_tokens` are generated, and its output ends at
the first stop token.

Sampling (`SamplingParams.temperature`, `top_k`, `top_p`, `seed`) follows the published
sampler: the filtered, tempered distribution gives the token and its confidence. Greedy
(temperature 0) takes the argmax, with the softmax probability of the raw logits as its
confidence (lmdeploy's scoring; the published sampler has no greedy mode). A pass commits at
most the masked positions it has (the published `topk` would overwrite unmasked ones), and a
position stays masked until committed, even to `mask_token_id` (the published loop compares
tokens with the mask id).

`block_diffusion_generate` is a stand-alone loop over the dense forward (each pass recomputes
the rows up to their block, one compiled shape per padded length); the serving engine's
path (`LLM.generate`, paged KV, one pass per engine step) is `serving/engine/diffusion_engine.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flax import nnx

from model_lib.config import ModelConfig
from serving.sampling_params import Bound, SamplingParams

REMASKING_STRATEGIES = ("low_confidence_static", "low_confidence_dynamic", "sequential")
CONFIDENCE_THRESHOLD_BOUND = Bound(0, 1)


@dataclass(frozen=True)
class BlockDiffusionParams:
    """Block diffusion settings of a request; `block_size` is the checkpoint's.

    `denoising_steps`: passes per block, 1 to block_size (None: block_size, one token a pass).
    """

    denoising_steps: int | None = None
    remasking_strategy: str = "low_confidence_static"
    confidence_threshold: float = 0.85

    def __post_init__(self) -> None:
        steps = self.denoising_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"denoising_steps must be a positive integer, got {steps!r}")
        if self.remasking_strategy not in REMASKING_STRATEGIES:
            raise ValueError(f"unknown remasking_strategy {self.remasking_strategy!r}; expected one of {REMASKING_STRATEGIES}")
        if not CONFIDENCE_THRESHOLD_BOUND.holds(self.confidence_threshold):
            raise ValueError(f"confidence_threshold must be in {CONFIDENCE_THRESHOLD_BOUND.describe()}, "
                             f"got {self.confidence_threshold!r}")

    def steps_for(self, block_size: int) -> int:
        """The denoising passes per block; more than `block_size` would leave passes that commit nothing."""
        steps = block_size if self.denoising_steps is None else self.denoising_steps
        if steps > block_size:
            raise ValueError(f"denoising_steps ({steps}) must not exceed the block size ({block_size})")
        return steps


def check_engine_support(config: ModelConfig) -> None:
    """`LLMEngine` decodes token by token; a block diffusion model is refused by name."""
    if config.block_causal_size is not None:
        raise NotImplementedError(
            f"{config.architecture}: LLMEngine decodes token by token; block diffusion models are served by "
            "serving.engine.diffusion_engine.BlockDiffusionEngine (what LLM picks for them)"
        )


def num_transfer_tokens(block_size: int, steps: int) -> list[int]:
    """Positions each pass commits: block_size // steps, plus one on the first block_size % steps passes."""
    base, remainder = divmod(block_size, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


def pick_tokens(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Token and confidence of each position from float32 logits `[L, V]`."""
    if params.greedy:
        tokens = logits.argmax(-1)
        probs = _softmax(logits)
        return tokens, np.take_along_axis(probs, tokens[:, None], -1)[:, 0]
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = np.sort(logits, -1)[:, -params.top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if params.top_p < 1.0:
        order = np.argsort(-logits, -1, kind="stable")
        cumulative = np.cumsum(_softmax(np.take_along_axis(logits, order, -1)), -1)
        drop = np.concatenate([np.zeros_like(cumulative[:, :1], bool), cumulative[:, :-1] > params.top_p], -1)
        np.put_along_axis(logits, order, np.where(drop, -np.inf, np.take_along_axis(logits, order, -1)), -1)
    probs = _softmax(logits)
    tokens = np.array([rng.choice(len(p), p=p / p.sum()) for p in probs])
    return tokens, np.take_along_axis(probs, tokens[:, None], -1)[:, 0]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def commit_positions(masked: np.ndarray, confidence: np.ndarray, count: int, params: BlockDiffusionParams) -> np.ndarray:
    """Indices (within the block) of the masked positions this pass commits."""
    count = min(count, int(masked.sum()))
    if params.remasking_strategy == "sequential":
        return np.flatnonzero(masked)[:count]
    confidence = np.where(masked, confidence, -np.inf)
    if params.remasking_strategy == "low_confidence_dynamic":
        confident = np.flatnonzero(confidence > params.confidence_threshold)
        if len(confident) >= count:
            return confident
    return np.argsort(-confidence, kind="stable")[:count]


@nnx.jit
def _logits(model, input_ids, attention_mask):
    return model(input_ids, attention_mask)


def block_diffusion_generate(
    model,
    prompts: list[list[int]],
    sampling: SamplingParams,
    diffusion: BlockDiffusionParams | None = None,
    *,
    eos_token_ids: tuple[int, ...] | None = None,
) -> list[list[int]]:
    """Generated tokens of each prompt (up to and including its first stop token, at most `max_tokens`)."""
    config: ModelConfig = model.config
    size, mask_id = config.block_causal_size, config.mask_token_id
    if size is None or mask_id is None:
        raise ValueError(f"{config.architecture} is not a block diffusion model (no block size or mask token)")
    diffusion = diffusion or BlockDiffusionParams()
    steps = diffusion.steps_for(size)
    transfers = num_transfer_tokens(size, steps)
    if sampling.max_tokens is None:
        raise ValueError("block diffusion decoding needs max_tokens")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("block diffusion decoding needs a non-empty prompt")
    stops = set(sampling.stop_token_ids)
    if not sampling.ignore_eos:
        stops |= set(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    rng = np.random.default_rng(sampling.seed)

    totals = [-(-(len(p) + sampling.max_tokens) // size) * size for p in prompts]
    width = max(totals)
    if width > config.max_position_embeddings:
        raise ValueError(f"a prompt and max_tokens fill {width} positions (whole blocks of {size}), more than the "
                         f"model's {config.max_position_embeddings}")
    ids = np.full((len(prompts), width), mask_id, np.int32)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = p
    pending = np.arange(width)[None, :] >= np.array([len(p) for p in prompts])[:, None]  # masked, not yet committed
    block = np.array([len(p) // size for p in prompts])  # each row's block being denoised
    step = np.zeros(len(prompts), int)
    done = np.zeros(len(prompts), bool)
    while not done.all():
        ends = (block + 1) * size
        visible = (np.arange(width)[None, :] < ends[:, None]).astype(np.int32)
        logits = np.asarray(_logits(model, ids, visible), np.float32)
        for row in np.flatnonzero(~done):
            start, end = block[row] * size, ends[row]
            masked = pending[row, start:end]  # a view: commits clear it
            tokens, confidence = pick_tokens(logits[row, start:end], sampling, rng)
            chosen = commit_positions(masked, confidence, transfers[step[row]], diffusion)
            ids[row, start + chosen] = tokens[chosen]
            masked[chosen] = False
            step[row] += 1
            if masked.any():
                continue
            generated = ids[row, len(prompts[row]) : end]
            if stops & set(generated.tolist()) or end >= totals[row]:
                done[row] = True
            block[row], step[row] = block[row] + 1, 0
    outputs = []
    for row, p in enumerate(prompts):
        generated = ids[row, len(p) : totals[row]].tolist()
        stop_at = next((i for i, t in enumerate(generated) if t in stops), None)
        if stop_at is not None:
            generated = generated[: stop_at + 1]
        outputs.append(generated[: sampling.max_tokens])
    return outputs
