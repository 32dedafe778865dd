"""The engine loop: scheduler -> model runner -> sampler -> detokenizer -> outputs.

`LLMEngine` owns the device. Callers add requests (token ids plus
`SamplingParams`) and call `step()` repeatedly; each step runs one ragged batch
and returns the outputs of the requests that progressed. Requests can be
aborted at any time; their pages go back to the pool at once.

Faults stay with their request: an exception while preparing one sequence's
sampling row, or while appending and detokenizing its token, fails that
request (an output with `error` set) and the step goes on for the others. Only
what runs on the device (the model step and the sampler) can fail a whole
step; that exception leaves `step()` and the engine is no longer usable.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from model_lib import CausalLM, cache_spec
from model_lib.cache_spec import cache_specs
from model_lib.sharding import ShardingPlan
from model_lib.spans import Span
from pallas_kernels.paged_attention.kv_quant import resolve_kv_cache_dtype
from serving.block_diffusion import check_engine_support
from serving.engine import multihost
from serving.engine.detokenizer import IncrementalDetokenizer, find_stop
from serving.engine.kv_pages import PagePool
from serving.engine.limits import RequestLimits, check_max_model_len, validate_request
from serving.engine.mla_prefill import expanded_prefill_tokens
from serving.engine.runner import ModelRunner, StepInputs, bucket, env_min_token_bucket
from serving.engine.sampler import SampleOutput, SamplingBatch, batch_from_rows, sampling_row
from serving.engine.scheduler import ScheduledSequence, Scheduler
from serving.engine.sequence import Sequence
from serving.engine.spans import check_span_images, check_spans
from serving.multimodal.encoder import image_encoder, release_prefilled
from serving.seq2seq import seq2seq_encoder
from serving.multimodal.inputs import ImageItem, check_placeholders, image_spans
from serving.engine.env import env_flag
from serving.engine.warmup import ENFORCE_EAGER_ENV, should_warm_up, use_compilation_cache, warm_up
from serving.engine.slot_state import count_row, new_slot_state, sample_slots, write_counts, write_rows
from serving.lora.manager import LoRAManager
from serving.outputs import CompletionOutput, Logprob, RequestOutput
from serving.sampling_params import RequestOutputKind, SamplingParams
from serving.structured.compiler import GrammarCompiler
from serving.structured.step_masks import StepMasks
from serving.structured.token_masks import TokenMasks, combine
from serving.spec_decode.build import speculative_step
from serving.spec_decode.config import SpeculativeConfig

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Engine sizes (vLLM's option names)."""

    max_model_len: int | None = None  # default: the model's max_position_embeddings
    allow_long_max_model_len: bool = False  # allow max_model_len beyond the model's (rope-scaled) positions
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    page_size: int = 16
    num_pages: int | None = None  # default: from free device memory (GPU) or a 1 GiB budget (CPU)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # Page dtype, vLLM's names: "auto" (the model's), "bfloat16", "float16", "float32", or quantized with a
    # float32 scale per token and kv head: "int8", "fp8" (= "fp8_e4m3"), "fp8_e5m2".
    kv_cache_dtype: str = "auto"
    seed: int = 0
    limits: RequestLimits = field(default_factory=RequestLimits)
    # True: skip compiling every step shape at start (each compiles on first use); vLLM's flag name.
    # None: warm up on an accelerator, not on the CPU backend (see serving/engine/warmup.py).
    enforce_eager: bool | None = field(default_factory=lambda: env_flag(ENFORCE_EAGER_ENV))
    compilation_cache_dir: str | None = None  # None: ~/.cache/jaxllm/xla or $JAXLLM_COMPILATION_CACHE_DIR; "": off
    # Run repeated layers through one lax.scan (compile time flat in depth); False unrolls them.
    # None: scan on an accelerator, unroll on the CPU backend (see serving/engine/runner.py).
    scan_layers: bool | None = None
    # Many LoRA adapters in one batch (vLLM's names): adapters are loaded into `max_loras` slots of
    # rank up to `max_lora_rank` (`serving/lora/manager.py`); requests pick one by name.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    # Vision-language models: image feature rows the encoder may compute per step, beside the token
    # budget (vLLM's name; None: max(max_num_batched_tokens, one image's rows)).
    max_num_encoder_input_tokens: int | None = None
    # vLLM's speculative_config: {"method": "ngram" | "draft_model", "num_speculative_tokens": k, ...}
    # (serving/spec_decode/config.py); None decodes one token per step.
    speculative_config: SpeculativeConfig | dict[str, Any] | None = None
    # MLA models (DeepSeek-V2/V3, MiniCPM3): prefill chunks of at least this many new tokens attend in the
    # expanded form (serving/engine/mla_prefill.py); None: the FLOP crossover of the model's shape, 0: never.
    mla_expanded_prefill_tokens: int | None = None
    # Smallest padded token count of a step (fewer shapes to compile; vLLM's smallest CUDA-graph size). Its
    # default is $JAXLLM_MIN_TOKEN_BUCKET; None: 1 on the CPU backend (every padded row costs there), else 8.
    min_token_bucket: int | None = field(default_factory=env_min_token_bucket)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    sequences: list[Sequence]
    detokenizers: list[IncrementalDetokenizer | None] = field(default_factory=list)
    lora_slot: int | None = None  # the adapter slot it holds until it leaves the engine

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.sequences)


@dataclass
class _InFlight:
    """A dispatched step: what it ran and its samples (device arrays, not read yet)."""

    scheduled: list[ScheduledSequence]
    completes: list[bool]
    sampled: SampleOutput


def _default_num_pages(config: EngineConfig, page_bytes: int, fixed_bytes: int, max_pages_per_seq: int) -> int:
    """Pages that fit the memory budget once the per-slot (recurrent) pools of `fixed_bytes` are taken."""
    wanted = config.max_num_seqs * max_pages_per_seq
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform == "gpu" else None
    if stats and "bytes_limit" in stats:
        budget = int(stats["bytes_limit"] * config.gpu_memory_utilization) - stats.get("bytes_in_use", 0)
    else:
        budget = 1 << 30
    num_pages = max(min(wanted, (budget - fixed_bytes) // page_bytes), max_pages_per_seq)
    # Every process of a multi-host engine allocates the same cache: the one that fits them all.
    return multihost.smallest(num_pages) if jax.process_count() > 1 else num_pages


def _sampling_row(seq: Sequence) -> tuple:
    """One sequence's SamplingBatch row (`ROW_COLUMNS` order), converted and so range-checked on its own."""
    p = seq.params
    return sampling_row(p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                        p.frequency_penalty, seq.seed, len(seq.output_ids))


def _token_ids(ids: Any) -> list[int]:
    """Plain ints from any integer sequence (numpy ints included); ValueError for anything else."""
    if isinstance(ids, (str, bytes)) or any(isinstance(t, bool) for t in ids):
        raise ValueError("prompt token ids must be integers")
    try:
        return [operator.index(t) for t in ids]
    except TypeError:
        raise ValueError("prompt token ids must be integers") from None


class LLMEngine:
    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        *,
        eos_token_ids: tuple[int, ...] | None = None,
        plan: ShardingPlan | None = None,
        draft_model: CausalLM | None = None,
    ):
        """`draft_model`: the draft of a `speculative_config` with method "draft_model"."""
        check_engine_support(model.config)
        self.model_config = model.config
        self.config = config = config or EngineConfig()
        use_compilation_cache(config.compilation_cache_dir)
        self.tokenizer = tokenizer
        self.max_model_len = check_max_model_len(config.max_model_len, model.config, config.allow_long_max_model_len)
        self.max_logprobs = min(config.limits.max_logprobs, model.config.vocab_size)
        self.eos_token_ids = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        max_pages_per_seq = -(-self.max_model_len // config.page_size)
        mc = model.config
        if mc.bidirectional_spans and (reason := mc.spans_unsupported_reason()):
            raise ValueError(f"{mc.architecture} declares bidirectional spans, which it cannot serve: {reason}")
        cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, mc.dtype)
        specs = cache_specs(mc)
        page_bytes = max(cache_spec.page_bytes(specs, config.page_size, cache_dtype), 1)
        fixed_bytes = cache_spec.fixed_bytes(specs, config.max_num_seqs + 1)
        num_pages = config.num_pages or _default_num_pages(config, page_bytes, fixed_bytes, max_pages_per_seq)
        if num_pages < max_pages_per_seq:
            raise ValueError(
                f"{num_pages} KV pages of {config.page_size} tokens cannot hold one sequence of "
                f"max_model_len={self.max_model_len}; lower max_model_len or add pages"
            )
        prefix_caching = config.enable_prefix_caching and cache_spec.prefix_cacheable(specs)
        if config.enable_prefix_caching and not prefix_caching:
            logger.info("prefix caching is off: %s keeps per-sequence state that KV pages cannot restore",
                        mc.architecture)
        self.pool = PagePool(num_pages, config.page_size, enable_prefix_caching=prefix_caching)
        self.images = image_encoder(model, config.max_num_encoder_input_tokens, config.max_num_batched_tokens)
        mm = mc.multimodal  # placeholder tokens a prompt may hold past the output vocabulary (Mllama's <|image|>)
        self._placeholders_past_vocab = set() if mm is None else \
            {t for t in (mm.image_token_id, mm.video_token_id) if t is not None and t >= mc.vocab_size}
        # Encoder-decoders: the prompt is the encoder's input (serving/seq2seq.py).
        self.seq2seq = seq2seq_encoder(model, config.max_num_encoder_input_tokens, config.max_num_batched_tokens)
        encoder = self.images or self.seq2seq
        self.scheduler = Scheduler(
            self.pool, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            encoder_budget=None if encoder is None else encoder.budget,
        )
        if config.enable_lora and jax.process_count() > 1:
            raise ValueError("LoRA adapters are not served across processes yet (multi-host)")
        self.lora = LoRAManager(model, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank) \
            if config.enable_lora else None
        self.runner = ModelRunner(
            model,
            num_pages=num_pages,
            page_size=config.page_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            plan=plan,
            scan_layers=config.scan_layers,
            kv_cache_dtype=cache_dtype,
            lora=self.lora,
            expanded_prefill_tokens=expanded_prefill_tokens(mc, config.mla_expanded_prefill_tokens,
                                                            config.max_num_batched_tokens),
            min_token_bucket=config.min_token_bucket,
        )
        self.slot_state = new_slot_state(config.max_num_seqs, mc.vocab_size, self.max_model_len)
        self._in_flight: _InFlight | None = None
        self.requests: dict[str, _Request] = {}
        self._rng = np.random.default_rng(config.seed)
        self._next_seq_id = 0
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.masks = StepMasks(tokenizer, model.config.vocab_size, self.eos_token_ids)  # structured output
        self.spec = speculative_step(self, config.speculative_config, draft_model)
        logger.info("KV cache: %d pages x %d tokens, %s (%.1f MiB)", num_pages, config.page_size, cache_dtype.name,
                    self.runner.kv_cache_bytes / 2**20)
        if should_warm_up(config.enforce_eager):
            warm_up(self)

    # -- requests -------------------------------------------------------------
    def validate_prompt(self, prompt_ids: list[int], encoder_features: np.ndarray | None = None) -> None:
        """Raise ValueError, naming the problem, for a prompt this engine cannot serve (`encoder_features`:
        an audio encoder-decoder's source, `prompt_ids` then being the decoder's prompt).

        Reads only fixed settings, so front ends may call it from any thread.
        """
        if encoder_features is not None:
            if self.seq2seq is None:
                raise ValueError(f"{self.model_config.architecture} takes no audio")
            self.seq2seq.validate_features(encoder_features)
        elif self.seq2seq is not None:
            return self.seq2seq.validate_source(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab, placeholders = self.model_config.vocab_size, self._placeholders_past_vocab
        if any(not isinstance(t, int) or (not 0 <= t < vocab and t not in placeholders) for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})"
                             + "".join(f" or {t}" for t in sorted(placeholders)))
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(prompt_ids)} tokens; max_model_len is {self.max_model_len}, "
                "which must leave room for at least one generated token"
            )

    def context_tokens(self, prompt_ids: list[int]) -> int:
        """What a prompt takes of max_model_len: its length, or an encoder-decoder's decoder prompt."""
        return len(prompt_ids) if self.seq2seq is None else len(self.seq2seq.decoder_prompt)

    def validate_request(self, prompt_ids: list[int], params: SamplingParams,
                         encoder_features: np.ndarray | None = None) -> None:
        """`validate_prompt`, then the engine's limits on the parameters (ValueError naming the limit),
        then the structured-output constraint, compiled (and cached) here so a bad one is the caller's error."""
        self.validate_prompt(prompt_ids, encoder_features)
        validate_request(params, self.config.limits, self.model_config.vocab_size)
        if params.structured_outputs is not None:
            self.grammar_compiler.compile(params.structured_outputs)

    def check_spans(self, prompt_ids: list[int], spans: Iterable[tuple[int, int]] | None) -> tuple[Span, ...]:
        """A request's bidirectional spans, sorted; ValueError naming the problem for spans this engine cannot
        serve (a model whose layers cannot attend them, a span outside the prompt or longer than one step)."""
        spans = list(spans or ())
        if not spans:
            return ()
        reason = self.model_config.spans_unsupported_reason()
        if reason is None and self.spec is not None:
            reason = "speculative decoding drafts causally"
        if reason is not None:
            raise ValueError(f"{self.model_config.architecture} cannot serve bidirectional spans: {reason}")
        return check_spans(spans, len(prompt_ids), self.config.max_num_batched_tokens)

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-output compiler (xgrammar over this tokenizer), built on first use; thread-safe."""
        return self.masks.compiler

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        images: list[ImageItem] | None = None,
        lora_name: str | None = None,
        encoder_features: np.ndarray | None = None,
        token_masks: TokenMasks | None = None,
        decoder_prompt_ids: list[int] | None = None,
        bidirectional_spans: Iterable[tuple[int, int]] | None = None,
    ) -> None:
        """Queue a request; raises ValueError for a prompt the engine cannot serve or an adapter it does not hold.

        `images`: the prompt's images, their placeholders already expanded (`serving.multimodal.inputs.ImageInputs`);
        `lora_name`: the loaded LoRA adapter to run it with; `encoder_features`: an audio encoder-decoder's
        source (Whisper's log-mel features; `prompt_ids` is then the decoder's prompt); `token_masks`: what its
        sampled tokens keep to (Whisper's suppressed tokens); `decoder_prompt_ids`: an encoder-decoder's decoder
        prompt in place of its default (beam search's beams); `bidirectional_spans`: `(start, end)` token ranges of
        the prompt (end exclusive) whose tokens attend to each other both ways (`serving/engine/spans.py`).
        """
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if decoder_prompt_ids is not None and (self.seq2seq is None or encoder_features is not None):
            raise ValueError("decoder_prompt_ids is for encoder-decoders with a token source")
        prompt_ids = _token_ids(prompt_ids)
        self.validate_request(prompt_ids, params, encoder_features)
        if lora_name is not None and self.lora is None:
            raise ValueError("this engine serves no LoRA adapters (enable_lora is off)")
        if lora_name is not None and lora_name not in self.lora.adapters:
            raise ValueError(f"no LoRA adapter named {lora_name!r} is loaded")
        images = list(images or [])
        spans = self.check_spans(prompt_ids, [*(bidirectional_spans or ()),
                                              *image_spans(images, self.model_config.multimodal)])
        check_placeholders(prompt_ids, images, self.model_config.multimodal)
        if images:
            self.images.check_fits(images)
            check_span_images(spans, images, self.images.budget)
        source, encoder_ids = prompt_ids, None
        encoder_len = self.images.encoder_len(images) if images else 0
        if encoder_features is not None:  # audio feeds the encoder; the prompt is the decoder's
            encoder_len = self.seq2seq.config.max_source_len
        elif self.seq2seq is not None:  # the prompt feeds the encoder; the decoder starts from its own prompt
            decoder = self.seq2seq.decoder_prompt if decoder_prompt_ids is None else _token_ids(decoder_prompt_ids)
            self.seq2seq.validate_decoder_prompt(decoder, self.max_model_len)
            encoder_ids, prompt_ids = prompt_ids, list(decoder)
            encoder_len = len(encoder_ids)
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        sequences = []
        for index in range(params.n):
            if params.seed is None:
                seed = int(self._rng.integers(2**31))
            else:
                # Signed 64-bit seeds (OpenAI's range) as their unsigned two's complement.
                seed = int(np.random.SeedSequence([params.seed % 2**64, index]).generate_state(1)[0])
            seq = Sequence(self._next_seq_id, request_id, index, list(prompt_ids), params, seed, max_tokens,
                           images=images, encoder_ids=encoder_ids, encoder_features=encoder_features,
                           encoder_len=encoder_len, token_masks=token_masks, spans=spans)
            seq.logprobs = [] if params.logprobs is not None else None
            if params.structured_outputs is not None:
                seq.matcher = self.grammar_compiler.matcher(params.structured_outputs)
            self._next_seq_id += 1
            sequences.append(seq)
        detokenizers = [
            IncrementalDetokenizer.for_prompt(self.tokenizer, prompt_ids, params.skip_special_tokens)
            if self.tokenizer is not None
            else None
            for _ in sequences
        ]
        adapter = self.lora.acquire(lora_name) if lora_name is not None else None  # nothing fails past here
        if adapter is not None:
            for seq in sequences:
                seq.lora_slot, seq.cache_salt = adapter.slot, adapter.cache_salt
        self.requests[request_id] = _Request(request_id, prompt, list(source), params, sequences, detokenizers,
                                             adapter.slot if adapter is not None else None)
        for seq in sequences:
            self.scheduler.add(seq)
        self.num_prompt_tokens += len(source)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its pages (no-op if it already finished)."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            for seq in request.sequences:
                self.scheduler.finish(seq, "abort")
            self._release_adapter(request)

    def _release_adapter(self, request: _Request) -> None:
        """A request left the engine: its adapter slot may be freed (see `LoRAManager.unload`)."""
        if request.lora_slot is not None:
            self.lora.release(request.lora_slot)
            request.lora_slot = None

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # -- the step -------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Dispatch the next batch, then read the previous one; outputs of the requests that progressed.

        Steps overlap (vLLM's async scheduling): step N+1 is scheduled, prepared and dispatched
        while step N still runs, its decode inputs taken on the device from N's samples; only
        then does the host wait for N's tokens. A sequence that N finishes (a stop token) was
        already scheduled in N+1: that extra token is dropped and its pages are freed. Requests
        that fail in this call come back with `error` set. With a `speculative_config` the step
        is `SpeculativeStep.step` (serving/spec_decode/step.py): synchronous, several tokens per
        sequence.
        """
        if self.spec is not None:
            return self.spec.step()
        failed: dict[str, RequestOutput] = {}
        scheduled = self.scheduler.schedule()
        self._write_joined_rows(failed)
        outputs, drained = [], False
        if self._in_flight is not None and any(item.seq.matcher is not None and item.seq.num_pending
                                               for item in scheduled):
            # A grammar's mask for this step needs the token the step in flight samples: read that
            # step first (no overlap for this one); sequences it finishes drop out of this step.
            outputs, self._in_flight, drained = self._read(self._in_flight, failed), None, True
        grammar_rows = self._grammar_rows(scheduled, failed)
        if failed or drained:
            kept = [i for i, item in enumerate(scheduled) if not item.seq.finished]
            grammar_rows = {new: grammar_rows[old] for new, old in enumerate(kept) if old in grammar_rows}
            scheduled = [scheduled[i] for i in kept]
        # The device part: an exception here leaves step() (the engine cannot go on).
        launched = self._launch(scheduled, grammar_rows) if scheduled else None
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            outputs = self._read(previous, failed)
        return outputs + list(failed.values())

    def _grammar_rows(self, scheduled: list[ScheduledSequence], failed: dict[str, RequestOutput]) -> dict[int, np.ndarray]:
        """Bitmask rows of the constrained sequences this step samples, by position in `scheduled`.

        Each grammar's matcher has read every earlier token of its sequence (see `step`).
        """
        rows = {}
        for i, item in enumerate(scheduled):
            seq = item.seq
            if (seq.matcher is None and seq.token_masks is None) or not item.completes_sequence or seq.finished:
                continue
            try:
                row = None if seq.matcher is None else self.masks.row(seq.matcher)
                if seq.token_masks is not None:
                    row = combine(row, seq.token_masks.row(len(seq.output_ids) + seq.num_pending))
                rows[i] = row
            except Exception as e:  # noqa: BLE001 - fails this request only
                self._fail(seq.request_id, "building its grammar mask", e, failed)
        return rows

    def _write_joined_rows(self, failed: dict[str, RequestOutput]) -> None:
        """Write the device sampling rows of the sequences that just joined the running batch."""
        slots, rows = [], []
        for seq in self.scheduler.take_joined():
            try:
                row = _sampling_row(seq)
                counts = count_row(seq.prompt_ids, seq.output_ids, self.model_config.vocab_size) \
                    if seq.params.uses_penalties else None
            except Exception as e:  # noqa: BLE001 - fails this request only
                self._fail(seq.request_id, "preparing its sampling parameters", e, failed)
                continue
            slots.append(seq.slot)
            rows.append(row)
            if counts is not None:
                self._write_counts(np.int32(seq.slot), counts)
        if rows:
            size = bucket(len(rows), 1, self.config.max_num_seqs)
            padded = np.full(size, self.config.max_num_seqs, np.int32)  # out of range: dropped
            padded[: len(slots)] = slots
            self._write_rows(padded, batch_from_rows(rows, size, None, None))

    def _launch(self, scheduled: list[ScheduledSequence], grammar_rows: dict[int, np.ndarray]) -> _InFlight:
        """Dispatch the model step and the sampler (nothing waits for the device); `grammar_rows`: the
        bitmask rows of constrained sequences by position in `scheduled`."""
        completes = [item.completes_sequence for item in scheduled]
        inputs = self.runner.prepare(scheduled)
        if self.seq2seq is not None:
            self.seq2seq.fill(self.runner, scheduled)
        if self.images is not None:
            self.images.fill(self.runner, scheduled)
            inputs.merged = self.images.merged(scheduled, inputs.shape[0])
        rows = inputs.logits_indices.shape[0]  # the step's logits rows
        slots = np.full(rows, self.config.max_num_seqs, np.int32)
        slots[: len(scheduled)] = [item.seq.slot for item in scheduled]
        mask = np.zeros(rows, bool)
        mask[: len(scheduled)] = completes
        seqs = [item.seq for item, done in zip(scheduled, completes) if done]
        wants_logprobs = any(s.params.logprobs is not None for s in seqs)
        sampled = self._dispatch(inputs, slots, mask, self.max_logprobs if wants_logprobs else None,
                                 any(s.params.uses_penalties for s in seqs), self.masks.step(grammar_rows, rows))
        self.scheduler.update_after_step(scheduled)
        for item in scheduled:
            if item.seq.images and (request := self.requests.get(item.seq.request_id)) is not None:
                release_prefilled(request.sequences)
        for seq in seqs:
            seq.num_pending += 1
        return _InFlight(scheduled, completes, sampled)

    # -- device calls ---------------------------------------------------------
    # The only methods that take host values into jitted computations: a multi-host leader
    # broadcasts each call and the followers replay it (serving/engine/multihost.py).
    DEVICE_CALLS = ("_write_counts", "_write_rows", "_dispatch")

    def _write_counts(self, slot: np.int32, counts: np.ndarray) -> None:
        self.slot_state = write_counts(self.slot_state, slot, counts)

    def _write_rows(self, slots: np.ndarray, rows: SamplingBatch) -> None:
        self.slot_state = write_rows(self.slot_state, slots, rows)

    def _dispatch(
        self, inputs: StepInputs, slots: np.ndarray, completes: np.ndarray, num_logprobs: int | None, use_penalties: bool,
        bitmask: np.ndarray | None = None,
    ) -> SampleOutput:
        """The model step on `inputs`, then the sampler on its logits (row i with slot `slots[i]`, masked by
        `bitmask` row i; None: no row has a grammar)."""
        logits = self.runner.run(inputs)
        if bitmask is None:
            bitmask = self.masks.all_allowed(len(slots))
        sampled, self.slot_state, self.runner.fed_tokens = sample_slots(
            logits, self.slot_state, self.runner.fed_tokens, slots, completes, bitmask,
            num_logprobs=num_logprobs, use_penalties=use_penalties,
        )
        return sampled

    def _read(self, flight: _InFlight, failed: dict[str, RequestOutput]) -> list[RequestOutput]:
        """Wait for a dispatched step's samples; append them, apply stops, build outputs."""
        fields = {f.name: getattr(flight.sampled, f.name) for f in dataclasses.fields(flight.sampled)}
        sampled = {k: np.asarray(v) for k, v in jax.device_get(fields).items() if v is not None}
        tokens = sampled["tokens"].tolist()  # plain ints, converted once
        touched: dict[str, _Request] = {}
        for i, (item, completes) in enumerate(zip(flight.scheduled, flight.completes)):
            seq = item.seq
            if not completes:
                continue  # a prefill chunk: no token yet
            seq.num_pending -= 1
            self._take_tokens(seq, tokens[i : i + 1], sampled, i, touched, failed)
        return self._outputs(touched, failed)

    def _take_tokens(self, seq: Sequence, tokens: list[int], sampled: dict[str, np.ndarray], first_row: int,
                     touched: dict[str, _Request], failed: dict[str, RequestOutput]) -> None:
        """Append a sequence's new tokens (rows `first_row`, `first_row + 1`, ... of `sampled`) up to a stop."""
        request = self.requests.get(seq.request_id)
        if seq.finished or request is None:
            return  # the extra token of a sequence that finished (or failed) meanwhile
        try:
            for row, token in enumerate(tokens, first_row):
                self._append_token(request, seq, token, sampled, row)
                if seq.finished:
                    break
            if not seq.finished:
                self.scheduler.roll_back(seq)
                self.scheduler.register_full_pages(seq)
            touched[request.request_id] = request
        except Exception as e:  # noqa: BLE001 - fails this request only
            touched.pop(request.request_id, None)
            self._fail(request.request_id, "appending and detokenizing its token", e, failed)

    def _outputs(self, touched: dict[str, _Request], failed: dict[str, RequestOutput]) -> list[RequestOutput]:
        """The outputs of the requests a step advanced; finished requests are retired."""
        outputs = []
        for request in touched.values():
            finished = request.finished
            try:
                output = self._output(request, finished)
            except Exception as e:  # noqa: BLE001 - fails this request only
                self._fail(request.request_id, "building its output", e, failed)
                continue
            if output is not None:
                outputs.append(output)
            if finished:
                self._release_adapter(self.requests.pop(request.request_id))
        return outputs

    def _fail(self, request_id: str, phase: str, error: Exception, failed: dict[str, RequestOutput]) -> None:
        """Retire a request after an exception of its own; its output carries the error."""
        logger.error("request %s failed while %s", request_id, phase, exc_info=error)
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.sequences:
            self.scheduler.finish(seq, "error")
        self._release_adapter(request)
        failed[request_id] = RequestOutput(
            request_id=request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_ids,
            outputs=[
                CompletionOutput(index=seq.index, text=seq.text, token_ids=list(seq.output_ids), finish_reason="error")
                for seq in request.sequences
            ],
            finished=True,
            error=f"the request failed while {phase}: {error!r}",
        )

    def _append_token(self, request: _Request, seq: Sequence, token: int, sampled: dict[str, np.ndarray], row: int) -> None:
        params = seq.params
        if self.seq2seq is not None:
            token = self.seq2seq.forced_token(seq, token)
        seq.output_ids.append(token)
        self.num_generated_tokens += 1
        if seq.logprobs is not None:
            logprob = float(sampled["logprobs"][row])
            seq.cumulative_logprob += logprob
            entry = {token: Logprob(logprob, int(sampled["ranks"][row]), self._decode_one(token))}
            for rank in range(params.logprobs):
                tid = int(sampled["top_ids"][row, rank])
                entry.setdefault(tid, Logprob(float(sampled["top_logprobs"][row, rank]), rank + 1, self._decode_one(tid)))
            seq.logprobs.append(entry)

        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise ValueError(f"token {token} does not continue the request's grammar")
        if token in params.stop_token_ids:
            self.scheduler.finish(seq, "stop", token)
            return
        if (token in self.eos_token_ids and not params.ignore_eos) or (seq.matcher is not None and seq.matcher.is_terminated()):
            self.scheduler.finish(seq, "stop")
            return
        detokenizer = request.detokenizers[seq.index]
        if detokenizer is not None:
            new_from = len(seq.text)
            seq.text += detokenizer.add(token)
            if params.stop and (hit := find_stop(seq.text, new_from, params.stop, params.include_stop_str_in_output)):
                cut, stop = hit
                seq.text = seq.text[:cut]
                self.scheduler.finish(seq, "stop", stop)
                return
        if len(seq.output_ids) >= seq.max_tokens:
            self.scheduler.finish(seq, "length")

    def _decode_one(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token])

    @staticmethod
    def _visible_text(seq: Sequence) -> str:
        """The text so far, minus a tail that could still turn out to start a stop string.

        Held back while the sequence runs, so streamed text only ever grows.
        """
        if seq.finished or not seq.params.stop:
            return seq.text
        hold = max(map(len, seq.params.stop)) - 1
        return seq.text[: max(0, len(seq.text) - hold)]

    def _output(self, request: _Request, finished: bool) -> RequestOutput | None:
        """The request's output after a step, in its `output_kind` (None: nothing to send yet)."""
        kind = request.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_ids,
            outputs=[self._completion(seq, kind, finished) for seq in request.sequences],
            finished=finished,
        )

    def _completion(self, seq: Sequence, kind: RequestOutputKind, final: bool) -> CompletionOutput:
        text = self._visible_text(seq)
        if kind is RequestOutputKind.DELTA:
            start, seq.emitted = seq.emitted, len(seq.output_ids)
            text_start, seq.emitted_text = seq.emitted_text, len(text)
            token_ids, text = seq.output_ids[start:], text[text_start:]
            logprobs = None if seq.logprobs is None else seq.logprobs[start:]
        elif final:  # the sequence's own lists: nothing appends to them any more
            token_ids, logprobs = seq.output_ids, seq.logprobs
        else:
            token_ids = list(seq.output_ids)
            logprobs = None if seq.logprobs is None else list(seq.logprobs)
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=None if seq.logprobs is None else seq.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
