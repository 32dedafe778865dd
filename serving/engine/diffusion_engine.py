"""Block diffusion decoding through the paged engine (SDAR): `LLM.generate` on a block diffusion checkpoint.

The math is `serving/block_diffusion.py`'s; here every running sequence advances one denoising pass
per engine step, beside the others, over the paged KV cache. A sequence's state is its committed
KV prefix (`num_computed`, always a block boundary) and the block being denoised. Each step feeds
`[num_computed, block end)`: on its first step the prompt's whole blocks (in chunks of whole blocks
when the budget is short), then the block (the prompt's tail, committed and masked positions) again
on every pass, its KV rewritten each time while `num_computed` stays at the block's start. Every
block is a bidirectional span (`serving/engine/spans.py`), so the step's `visible_until` makes the
attention block-causal. The logits of the block's positions come back (argmax and its probability
on the device when greedy); the host commits positions by the remasking strategy. A committed block
is fed once more with the next block's first pass, which writes its final KV, and `num_computed`
moves past it. Outputs are whole blocks, cut at the first stop token and at `max_tokens`.

Steps run synchronously (a pass needs the previous pass's commits). A sequence keeps its pages until it
finishes (no preemption: a step in which no running sequence gets the pages it needs raises). Not served
here: prefix caching, LoRA adapters, speculative decoding, logprobs, stop strings, penalties, min_p,
structured outputs, n > 1 (each refused by name), nor the OpenAI server (`serve` refuses SDAR).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from model_lib import CausalLM, cache_spec
from model_lib.cache_spec import cache_specs
from model_lib.sharding import ShardingPlan
from pallas_kernels.paged_attention.kv_quant import resolve_kv_cache_dtype
from serving.block_diffusion import BlockDiffusionParams, commit_positions, num_transfer_tokens, pick_tokens
from serving.engine.engine import EngineConfig, _default_num_pages
from serving.engine.kv_pages import PagePool
from serving.engine.limits import check_max_model_len
from serving.engine.runner import ModelRunner
from serving.engine.scheduler import ScheduledSequence
from serving.engine.sequence import Sequence
from serving.outputs import CompletionOutput, RequestOutput
from serving.sampling_params import SamplingParams


@dataclass(eq=False)
class _Diffusing:
    """One request's sequence and the block it is denoising."""

    seq: Sequence
    prompt: str | None
    block_start: int  # first position of the block being denoised
    pending: np.ndarray  # [L] bool: positions of the block not committed yet
    passes: int = 0  # denoising passes run on this block
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    @property
    def block_end(self) -> int:
        return self.block_start + len(self.pending)


@jax.jit
def _greedy_picks(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Argmax of each row and its softmax probability: all a greedy pass needs from `[R, V]` logits."""
    tokens = jnp.argmax(logits, -1)
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
    return tokens, jnp.take_along_axis(probs, tokens[:, None], -1)[:, 0]


class BlockDiffusionEngine:
    """`LLMEngine`'s interface (`add_request`, `step`, `abort_request`) for a block diffusion model."""

    lora = None

    def __init__(self, model: CausalLM, tokenizer, config: EngineConfig | None = None, *,
                 eos_token_ids: tuple[int, ...] | None = None, plan: ShardingPlan | None = None,
                 block_diffusion: BlockDiffusionParams | None = None):
        mc = model.config
        self.config = config = config or EngineConfig()
        if config.enable_lora or config.speculative_config is not None:
            raise ValueError(f"{mc.architecture}: block diffusion decoding serves no LoRA adapters or speculation")
        self.block_size, self.mask_id = mc.block_causal_size, mc.mask_token_id
        self.diffusion = block_diffusion or BlockDiffusionParams()
        self.transfers = num_transfer_tokens(self.block_size, self.diffusion.steps_for(self.block_size))
        if config.max_num_batched_tokens < 2 * self.block_size:
            raise ValueError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must hold two blocks of "
                             f"{self.block_size}: a committed block is fed with the next block's first pass")
        self.tokenizer = tokenizer
        self.max_model_len = check_max_model_len(config.max_model_len, mc, config.allow_long_max_model_len)
        self.eos_token_ids = set(mc.eos_token_ids if eos_token_ids is None else eos_token_ids)
        max_pages_per_seq = -(-self.max_model_len // config.page_size)
        cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, mc.dtype)
        specs = cache_specs(mc)
        page_bytes = max(cache_spec.page_bytes(specs, config.page_size, cache_dtype), 1)
        fixed_bytes = cache_spec.fixed_bytes(specs, config.max_num_seqs + 1)
        num_pages = config.num_pages or _default_num_pages(config, page_bytes, fixed_bytes, max_pages_per_seq)
        self.pool = PagePool(num_pages, config.page_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, num_pages=num_pages, page_size=config.page_size,
                                  max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                                  max_model_len=self.max_model_len, plan=plan, scan_layers=config.scan_layers,
                                  kv_cache_dtype=cache_dtype, min_token_bucket=config.min_token_bucket)
        self.waiting: list[_Diffusing] = []
        self.running: list[_Diffusing] = []
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self._next_seq = 0

    # Requests

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, lora_name: str | None = None, **inputs) -> None:
        """Queue a request; ValueError naming what block diffusion decoding does not serve."""
        if lora_name is not None:
            raise ValueError("block diffusion decoding serves no LoRA adapters")
        if inputs:
            raise ValueError(f"block diffusion decoding takes token prompts only, not {', '.join(sorted(inputs))}")
        for name, unsupported in (("n > 1", params.n > 1), ("logprobs", params.logprobs is not None),
                                  ("stop strings", bool(params.stop)), ("penalties", params.uses_penalties),
                                  ("min_p", params.min_p > 0), ("structured outputs", params.structured_outputs)):
            if unsupported:
                raise ValueError(f"block diffusion decoding does not support {name}")
        if not prompt_ids:
            raise ValueError("block diffusion decoding needs a non-empty prompt")
        size = self.block_size
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if max_tokens < 1 or -(-(len(prompt_ids) + max_tokens) // size) * size > self.max_model_len:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) and max_tokens, in whole blocks of {size}, "
                             f"exceed max_model_len={self.max_model_len}")
        if any(r.seq.request_id == request_id for r in self.waiting + self.running):
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(self._next_seq, request_id, 0, list(prompt_ids), params, params.seed or 0, max_tokens)
        self._next_seq += 1
        start = len(prompt_ids) // size * size
        pending = np.arange(start, start + size) >= len(prompt_ids)
        seq.output_ids = [self.mask_id] * int(pending.sum())  # the block's draft: committed and masked positions
        self.waiting.append(_Diffusing(seq, prompt, start, pending, rng=np.random.default_rng(params.seed)))

    def abort_request(self, request_id: str) -> None:
        for item in [r for r in self.waiting + self.running if r.seq.request_id == request_id]:
            self._retire(item)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # Steps

    def _schedule(self) -> list[tuple[_Diffusing, int]]:
        """(sequence, tokens fed) for this step: running sequences first, then waiting ones while slots,
        budget and pages last; a sequence gets its whole chunk up to its block end or, while its prompt's
        blocks are still being prefilled, as many whole blocks as fit."""
        budget, chosen = self.config.max_num_batched_tokens, []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            item = self.waiting.pop(0)
            item.seq.slot = self._free_slots.pop()
            self.running.append(item)
        for item in self.running:
            seq, size = item.seq, self.block_size
            chunk = item.block_end - seq.num_computed
            if chunk > budget:  # prefilling: whole blocks short of the block being denoised
                chunk = min(budget // size * size, item.block_start - seq.num_computed)
            if chunk <= 0:
                continue
            needed = -(-(seq.num_computed + chunk) // self.pool.page_size) - len(seq.pages)
            if needed > self.pool.num_free():
                continue  # waits for pages a finishing sequence gives back
            if needed > 0:
                seq.pages += self.pool.allocate(needed)
            # The chunk's blocks are spans: the step's visible_until makes them block-causal.
            seq.spans = tuple((s, s + size) for s in range(seq.num_computed, seq.num_computed + chunk, size))
            chosen.append((item, chunk))
            budget -= chunk
        if self.running and not chosen:
            raise RuntimeError("no running sequence fits the KV pages; add pages or lower max_num_seqs")
        return chosen

    def step(self) -> list[RequestOutput]:
        """One denoising pass of every scheduled sequence; the outputs of the requests that finished (each
        request's one output comes when it finishes, whatever its `output_kind`)."""
        chosen = self._schedule()
        if not chosen:
            return []
        size = self.block_size
        inputs = self.runner.prepare([ScheduledSequence(item.seq, chunk) for item, chunk in chosen])
        # Logits of each sequence's block positions (only for those whose chunk reaches its block end).
        cu = np.cumsum([chunk for _, chunk in chosen])
        denoising = [k for k, (item, chunk) in enumerate(chosen) if item.seq.num_computed + chunk == item.block_end]
        rows = np.zeros(inputs.logits_indices.shape[0] * size, np.int32)  # padded like the sequences: one compile
        for j, k in enumerate(denoising):
            rows[j * size : (j + 1) * size] = np.arange(cu[k] - size, cu[k])
        inputs.logits_indices = rows
        logits = self.runner.run(inputs)
        greedy = all(chosen[k][0].seq.params.greedy for k in denoising)
        if greedy:
            tokens, confidence = (np.asarray(a) for a in _greedy_picks(logits))
        else:
            host_logits = np.asarray(logits, np.float32)
        finished, row_of = [], {k: j for j, k in enumerate(denoising)}
        for k, (item, chunk) in enumerate(chosen):
            seq = item.seq
            if k not in row_of:
                seq.num_computed += chunk  # prompt blocks whose KV is final
                continue
            seq.num_computed = item.block_start  # everything before the block now holds final KV
            block = slice(row_of[k] * size, (row_of[k] + 1) * size)
            if greedy:
                picked, conf = tokens[block], confidence[block]
            else:
                picked, conf = pick_tokens(host_logits[block], seq.params, item.rng)
            chosen_positions = commit_positions(item.pending, conf, self.transfers[item.passes], self.diffusion)
            for position in chosen_positions:
                index = item.block_start + int(position) - len(seq.prompt_ids)
                seq.output_ids[index] = int(picked[position])
            item.pending[chosen_positions] = False
            item.passes += 1
            if item.pending.any():
                continue
            if self._block_done(item):
                finished.append(self._finish(item))
        return finished

    def _stops(self, params: SamplingParams) -> set[int]:
        return set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)

    def _block_done(self, item: _Diffusing) -> bool:
        """After a block is committed: True when the request is done, else the next block starts."""
        seq = item.seq
        if self._stops(seq.params) & set(seq.output_ids) or len(seq.output_ids) >= seq.max_tokens:
            return True
        item.block_start += self.block_size
        item.pending = np.ones(self.block_size, bool)
        item.passes = 0
        seq.output_ids += [self.mask_id] * self.block_size
        return False

    def _finish(self, item: _Diffusing) -> RequestOutput:
        seq = item.seq
        stops = self._stops(seq.params)
        tokens = seq.output_ids
        stop_at = next((i for i, t in enumerate(tokens) if t in stops), None)
        reason, stop_reason = "length", None
        if stop_at is not None and stop_at < seq.max_tokens:
            tokens = tokens[: stop_at + 1]
            reason = "stop"
            stop_reason = None if tokens[-1] in self.eos_token_ids and tokens[-1] not in seq.params.stop_token_ids \
                else tokens[-1]
        tokens = tokens[: seq.max_tokens]
        shown = tokens[:-1] if reason == "stop" and not seq.params.include_stop_str_in_output else tokens
        text = "" if self.tokenizer is None else self.tokenizer.decode(
            shown, skip_special_tokens=seq.params.skip_special_tokens)
        self._retire(item)
        completion = CompletionOutput(0, text, list(tokens), finish_reason=reason, stop_reason=stop_reason)
        return RequestOutput(seq.request_id, item.prompt, seq.prompt_ids, [completion], finished=True)

    def _retire(self, item: _Diffusing) -> None:
        if item in self.running:
            self.running.remove(item)
            self._free_slots.append(item.seq.slot)
            item.seq.slot = None
        elif item in self.waiting:
            self.waiting.remove(item)
        self.pool.release(item.seq.pages)
        item.seq.pages = []
