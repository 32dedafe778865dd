"""`LLM`: the offline API (vLLM's convention) over the engine.

    llm = LLM("path/to/checkpoint")
    outputs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(outputs[0].outputs[0].text)
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

import model_lib
from model_lib import distributed
from model_lib.eagle3 import load_eagle3
from model_lib.encdec import seq2seq_architecture
from model_lib.encoders import decoder_pooling_model, load_pooling_model, pooling_architecture
from model_lib.families.deepseek_mtp import MTPDraft
from model_lib.gguf import is_gguf_file, load_gguf_tokenizer
from model_lib.sharding import ShardingPlan, as_plan
from serving.engine import EngineConfig, LLMEngine, multihost
from serving.engine.combined import GenerationWithPooling
from serving.engine.diffusion_engine import BlockDiffusionEngine
from serving.engine.pooling_engine import PoolingEngine
from serving.engine.warmup import use_compilation_cache
from serving.lora import LoRARequest
from serving.multimodal.chat import split_images
from serving.multimodal.media import MediaFetcher
from serving.multimodal.prompts import image_inputs, split_prompt
from serving.outputs import RequestOutput
from serving.pooling_api import PoolingMethods
from serving.audio.whisper import Transcriber, WindowRequest
from serving.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from serving.sampling_params import RequestOutputKind, SamplingParams
from serving.seq2seq import seq2seq_engine_model
from serving.spec_decode import SpeculativeConfig
from serving.spec_decode.build import check_draft_vocab
from serving.text_input import check_text

Prompt = str | dict[str, Any]


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer (`transformers.AutoTokenizer`), or None if it ships none.

    A GGUF file's tokenizer and chat template come from its metadata.
    """
    from transformers import AutoTokenizer, PretrainedConfig

    path = Path(path)
    if is_gguf_file(path):
        return load_gguf_tokenizer(path)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    # A remote-code config.json (`auto_map`) may not read as a plain transformers config
    # (legacy llama3 rotary keys); the tokenizer files name their own class.
    config_file = path / "config.json"
    remote = config_file.is_file() and "auto_map" in json.loads(config_file.read_text())
    extra = {"config": PretrainedConfig()} if remote else {}
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False, **extra)


def generation_eos_ids(path: str | Path, config_eos: tuple[int, ...]) -> tuple[int, ...]:
    """EOS ids from generation_config.json (if any) together with config.json's."""
    file = Path(path) / "generation_config.json"
    eos = set(config_eos)
    if file.is_file():
        value = json.loads(file.read_text()).get("eos_token_id")
        eos |= set(value if isinstance(value, list) else [] if value is None else [value])
    return tuple(sorted(eos))


def _final_only(params: SamplingParams) -> SamplingParams:
    """`params` asking for one output per request, when it finishes (no per-step copies of its lists)."""
    return dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)


class LLM(PoolingMethods):
    """Load a checkpoint folder or GGUF file and generate from it.

    A pooling checkpoint (`model_lib.encoders.POOLING_ARCHITECTURES`: BERT-style encoders and
    classifiers, Qwen2 reward models) gets a `PoolingEngine` instead and serves `embed`, `classify`,
    `score`, `reward` and `encode` (`serving/pooling_api.py`), not `generate`. `enable_embeddings=True`
    makes a generative model serve `embed` (its last token's final hidden state, normalised) besides
    `generate`, through the same engine (`serving/engine/combined.py`).

    Engine options use vLLM's names: `max_model_len`, `max_num_seqs`,
    `max_num_batched_tokens`, `page_size` (vLLM's block_size), `num_pages`,
    `gpu_memory_utilization`, `enable_prefix_caching`, `seed`, `enforce_eager` (no start-up
    compilation of every shape), `compilation_cache_dir`, `kv_cache_dtype` ("auto", "bfloat16",
    "float16", "float32", or quantized pages with per-token scales: "int8", "fp8" = "fp8_e4m3",
    "fp8_e5m2"), `speculative_config` (vLLM's: `{"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_max": 4}` or `{"method": "draft_model", "model": path, "num_speculative_tokens": 4}`),
    `scan_layers` (repeated layers through one
    `lax.scan`; default: on an accelerator, not on the CPU backend), `min_token_bucket` (the smallest
    padded step; default 1 on the CPU backend, 8 on an accelerator); `quantization` (vLLM's name): "int8" or
    "int4" serve weight-only int8 / int4 (group 128) linear layers and MoE experts, "gguf" keeps a
    GGUF file's Q4_0 / Q4_1 / Q8_0 blocks quantized, "fp8" W8A8 FP8 ones (per-channel
    FP8 weights of a float checkpoint, or an FP8 checkpoint's own kept in FP8); a pre-quantized
    checkpoint (AWQ, GPTQ, compressed-tensors, FP8) is detected from its config.json.
    `enable_lora`, `max_loras`, `max_lora_rank`: serve PEFT LoRA adapters, up to `max_loras` of them
    in one batch; `generate(..., lora_request=LoRARequest(name, id, path))` loads one on first use.
    A block diffusion checkpoint (SDAR) decodes by blocks (`serving/engine/diffusion_engine.py`); its
    `block_diffusion=BlockDiffusionParams(denoising_steps, remasking_strategy, confidence_threshold)`
    applies to every request.

    Multi-host (`jax.distributed`, `model_lib/distributed.py`): `coordinator_address` (process
    0's host:port), `num_processes` and `process_id`, or the environment jax.distributed reads
    (SLURM, Open MPI, `JAX_COORDINATOR_ADDRESS`). Every process builds the same `LLM` over one
    mesh of all processes' devices; process 0 (`is_leader`) generates, the others call
    `follow()`, which replays the leader's device calls until the leader's `shutdown()` (or
    its exit). See `serving/engine/multihost.py`.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        tokenizer: str | Path | None = None,
        dtype: Any = None,
        mesh: Mesh | ShardingPlan | str | None = None,
        quantization: str | None = None,
        coordinator_address: str | None = None,
        num_processes: int | None = None,
        process_id: int | None = None,
        enable_embeddings: bool = False,
        limit_mm_per_prompt: dict[str, int] | None = None,
        allowed_local_media_path: str | Path | None = None,
        **engine_args: Any,
    ):
        distributed.initialize(coordinator_address, num_processes, process_id)  # before any JAX computation
        use_compilation_cache(engine_args.get("compilation_cache_dir"))  # before anything compiles
        plan = as_plan(mesh)
        self.model_path = Path(model)
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.image_inputs = None
        self.transcriber: Transcriber | None = None
        self.media = MediaFetcher(allowed_local_media_path)
        if pooling_architecture(model) is not None:
            if plan is not None or quantization is not None or jax.process_count() > 1:
                raise ValueError("pooling models run unsharded and unquantized on one process for now")
            if engine_args.get("enable_lora") or engine_args.get("speculative_config"):
                raise ValueError("LoRA adapters and speculative decoding are for generative models, not pooling models")
            self.engine = PoolingEngine(load_pooling_model(model, dtype=dtype), self.tokenizer, EngineConfig(**engine_args))
        elif seq2seq_architecture(model) is not None:  # the prompt is the encoder's input (serving/seq2seq.py)
            net = seq2seq_engine_model(model, dtype=dtype, plan=plan, quantization=quantization, engine_args=engine_args)
            if enable_embeddings:
                raise ValueError("enable_embeddings is for decoder-only models")
            self.engine = LLMEngine(net, self.tokenizer, EngineConfig(**engine_args))
            if net.config.features_encoder:  # Whisper: audio in (serving/audio/whisper.py)
                self.transcriber = Transcriber.from_pretrained(model, self.tokenizer, net.config.vocab_size,
                                                               net.config.max_position_embeddings)
        else:
            net = model_lib.from_pretrained(model, dtype=dtype, mesh=plan, quantization=quantization)
            self.image_inputs = image_inputs(model, net.config, limit_mm_per_prompt)
            if self.image_inputs is not None:  # per-slot image state is sized by the image limit (Mllama's pools)
                sized = net.config.multimodal.with_image_limit(self.image_inputs.limit)
                net.config = net.config.replace(multimodal=sized)
            if self.image_inputs is not None and jax.process_count() > 1:
                raise ValueError("vision-language models are not supported on multi-host engines yet "
                                 "(the vision tower runs on the leader only)")
            speculative = SpeculativeConfig.parse(engine_args.pop("speculative_config", None))
            block_diffusion = engine_args.pop("block_diffusion", None)
            eos_ids = generation_eos_ids(model, net.config.eos_token_ids)
            if net.config.block_causal_size is not None:  # SDAR: serving/engine/diffusion_engine.py
                if enable_embeddings or self.image_inputs is not None or jax.process_count() > 1:
                    raise ValueError(f"{net.config.architecture}: block diffusion decoding serves text generation "
                                     "on one process only")
                self.engine = BlockDiffusionEngine(net, self.tokenizer, EngineConfig(**engine_args, speculative_config=speculative),
                                                   eos_token_ids=eos_ids, plan=plan, block_diffusion=block_diffusion)
            elif block_diffusion is not None:
                raise ValueError(f"block_diffusion is for block diffusion models (SDAR), not {net.config.architecture}")
            else:
                self.engine = LLMEngine(
                    net,
                    self.tokenizer,
                    EngineConfig(**engine_args, speculative_config=speculative),
                    eos_token_ids=eos_ids,
                    plan=plan,
                    draft_model=self._load_draft(speculative, dtype, net),
                )
            if enable_embeddings:
                if plan is not None or jax.process_count() > 1:
                    raise ValueError("enable_embeddings runs unsharded on one process for now")
                pooling = PoolingEngine(decoder_pooling_model(net, self.engine.max_model_len), self.tokenizer,
                                        EngineConfig(**engine_args))
                self.engine = GenerationWithPooling(self.engine, pooling)
        self._counter = 0
        self.is_leader = distributed.is_leader()
        self._leader = multihost.Leader(self.engine) if self.is_leader and jax.process_count() > 1 else None

    def _load_draft(self, speculative: SpeculativeConfig | None, dtype: Any, target: Any) -> Any:
        """The draft of a "draft_model" (its checkpoint, checked to share our vocabulary), "eagle3" (the heads
        at `model`) or "mtp" (the target's own MTP layer) speculative config."""
        if speculative is None or speculative.method == "ngram":
            return None
        if speculative.method == "mtp":
            return MTPDraft(target)
        if not Path(speculative.model).exists():
            raise ValueError(f"draft model {speculative.model!r} does not exist")
        if speculative.method == "eagle3":
            return load_eagle3(speculative.model, target)
        draft = model_lib.from_pretrained(speculative.model, dtype=dtype)
        check_draft_vocab(draft.config.vocab_size, target.config.vocab_size)
        draft_tokenizer = load_tokenizer(speculative.model)
        if draft_tokenizer is not None and self.tokenizer is not None:
            if draft_tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise ValueError("the draft model's tokenizer maps tokens differently from the target's; "
                                 "a draft model must share the target's tokenizer")
        return draft

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def follow(self) -> None:
        """On a follower process: run the leader's steps until the leader shuts down."""
        if self.is_leader:
            raise RuntimeError("process 0 leads: it generates, the other processes follow")
        multihost.follow(self.engine)

    def shutdown(self) -> None:
        """On a multi-host leader: end the followers' `follow()` (idempotent; also runs at exit)."""
        if self._leader is not None:
            self._leader.shutdown()

    def _check_leader(self) -> None:
        if not self.is_leader:
            raise RuntimeError(f"process {jax.process_index()} follows process 0: call follow(), not generate()")

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt needs 'prompt_token_ids'")
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer; pass prompts as {{'prompt_token_ids': [...]}}")
        check_text(prompt, "the prompt")
        return prompt, self.tokenizer.encode(prompt)

    def _adapter(self, lora_request: LoRARequest | None) -> str | None:
        """The engine's name for the request's adapter, loading it on first use."""
        if lora_request is None:
            return None
        lora = self.engine.lora
        if lora is None:
            raise ValueError("a lora_request needs LLM(..., enable_lora=True)")
        loaded = lora.adapters.get(lora_request.lora_name)
        if loaded is None:
            lora.load(lora_request.lora_name, lora_request.lora_path, lora_request.lora_int_id)
        elif Path(loaded.path) != Path(lora_request.lora_path):
            raise ValueError(f"adapter {lora_request.lora_name!r} is loaded from {loaded.path}, "
                             f"not {lora_request.lora_path}")
        return lora_request.lora_name

    def _add(self, prompt: Prompt, params: SamplingParams, lora_request: LoRARequest | None = None) -> str:
        self._check_leader()
        if isinstance(prompt, dict) and isinstance(prompt.get("multi_modal_data"), dict) \
                and "audio" in prompt["multi_modal_data"]:
            return self._add_audio(prompt, params)
        if isinstance(self.engine, PoolingEngine):
            raise ValueError(f"{self.model_path} is a pooling model ({self.engine.model.architecture}): use "
                             f"{', '.join(self.engine.tasks)}, not generate")
        prompt, images = split_prompt(prompt)
        if images and self.image_inputs is None:
            raise ValueError(f"{self.model_path} takes no images")
        text, ids = self._prompt_ids(self.image_inputs.prompt_text(prompt) if images else prompt)
        items = []
        if images:
            text = prompt if isinstance(prompt, str) else text
            ids, items = self.image_inputs(ids, images)
        return self._submit(ids, params, prompt=text, lora_name=self._adapter(lora_request),
                            **({"images": items} if items else {}))

    def _submit(self, prompt_ids: list[int], params: SamplingParams, **inputs: Any) -> str:
        """Queue one request under the next id (`inputs`: `LLMEngine.add_request`'s options); its id."""
        request_id = str(self._counter)
        self._counter += 1
        self.engine.add_request(request_id, prompt_ids, params, **inputs)
        return request_id

    def _add_audio(self, prompt: dict[str, Any], params: SamplingParams) -> str:
        """vLLM's Whisper prompt: `{"prompt": decoder prompt text (or "prompt_token_ids"), "multi_modal_data":
        {"audio": (samples, sampling_rate) or a file's bytes}}`, one window of audio (`transcribe` cuts longer
        audio); the checkpoint's suppressed tokens apply."""
        transcriber = self.transcriber
        if transcriber is None:
            raise ValueError(f"{self.model_path} takes no audio")
        data = prompt["multi_modal_data"]
        if set(data) != {"audio"}:
            raise ValueError("an audio prompt takes one 'audio' item and no other multi_modal_data")
        audio = data["audio"]
        samples, rate = audio if isinstance(audio, tuple) and len(audio) == 2 else (audio, None)
        features = transcriber.features(transcriber.samples(samples, rate))
        if len(features) != 1:
            raise ValueError(f"the audio is longer than one {transcriber.window / transcriber.sampling_rate:g} s "
                             "window; LLM.transcribe cuts it into windows")
        text = prompt.get("prompt")
        if "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
        elif isinstance(text, str) and self.tokenizer is not None:
            check_text(text, "the prompt")
            ids = self.tokenizer.encode(text, add_special_tokens=False)  # the prompt names its special tokens
        else:
            raise ValueError("an audio prompt needs the decoder's 'prompt' (text) or 'prompt_token_ids'")
        return self._submit(ids, params, prompt=text, encoder_features=features[0], token_masks=transcriber.masks)

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to OpenAI-style conversations (one, or a list of them) through the chat template.

        Content parts may be text, `image_url` (data:, http(s), or file: under `allowed_local_media_path`)
        or `image_pil` (a PIL image), as vLLM's `LLM.chat`.
        """
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model_path} has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            converted, images = split_images(conversation, self.media.fetch)
            text = self.tokenizer.apply_chat_template(converted, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
            # The template holds any BOS; with images, the text as the processor rewrites it (Gemma 3).
            rewritten = self.image_inputs.prompt_text(text) if images and self.image_inputs is not None else text
            ids = self.tokenizer.encode(rewritten, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids,
                            **({"multi_modal_data": {"image": images}} if images else {})})
        return self.generate(prompts, sampling_params)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt together (continuous batching); outputs in prompt order.

        `lora_request`: one adapter for every prompt, or one per prompt (None: the base model).

        Bad parameters or prompts raise ValueError before anything runs. A request
        that fails inside the engine comes back with `error` set (finish_reason
        "error"); the others complete as usual.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_request = [lora_request] * len(prompts)
        if len(lora_request) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(lora_request)} LoRA requests")
        return self._run([functools.partial(self._add, prompt, _final_only(params), lora)
                          for prompt, params, lora in zip(prompts, sampling_params, lora_request)])

    def _run(self, adds: list[Callable[[], str]]) -> list[RequestOutput]:
        """Queue every request (`add()` -> its id), step until all finish; their outputs in order (requests
        ask for FINAL_ONLY outputs, `_final_only`)."""
        ids = []
        try:
            for add in adds:
                ids.append(add())
            finished: dict[str, RequestOutput] = {}
            while len(finished) < len(ids):
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return [finished[request_id] for request_id in ids]

    def beam_search(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: BeamSearchParams,
        lora_request: LoRARequest | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's offline beam search (`serving/beam_search.py`): one `BeamSearchOutput` per prompt (a string or
        `{"prompt_token_ids": [...]}`; an encoder-decoder's source), its `beam_width` best beams first to last."""
        seq2seq = getattr(self.engine, "seq2seq", None)
        if isinstance(self.engine, PoolingEngine) or self.transcriber is not None:
            raise ValueError(f"beam search runs on text generation models, not {self.model_path}")
        params.validate(self.engine.config.limits.max_logprobs)
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if any(isinstance(p, dict) and "multi_modal_data" in p for p in prompts):
            raise ValueError("beam search takes text or token prompts (no images) for now")
        sources = [self._prompt_ids(p)[1] for p in prompts]

        def add(prompt: int, tokens: list[int], step: SamplingParams) -> str:
            if seq2seq is None:
                return self._add({"prompt_token_ids": tokens}, step, lora_request)
            return self._submit(sources[prompt], step, decoder_prompt_ids=tokens)

        def run(beams: list[tuple[int, list[int]]], step: SamplingParams) -> list[RequestOutput]:
            step = _final_only(step)
            return self._run([functools.partial(add, prompt, tokens, step) for prompt, tokens in beams])

        starts = sources if seq2seq is None else [list(seq2seq.decoder_prompt)] * len(sources)
        decode = None if self.tokenizer is None else self.tokenizer.decode
        return beam_search(starts, params, run, tuple(self.engine.eos_token_ids), self.engine.max_model_len, decode)

    def transcribe(
        self,
        audio: bytes | np.ndarray,
        *,
        sampling_rate: int | None = None,
        language: str | None = None,
        task: str = "transcribe",
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Whisper: transcribe (or `task="translate"`) `audio`, a file's bytes (WAV, FLAC, OGG, MP3) or samples
        at `sampling_rate`; one output per 30 s window, in order (`serving.audio.whisper.join_texts` joins
        their texts). `language` unset on a multilingual model: detected per window. Default sampling: greedy,
        up to the decoder's length."""
        transcriber = self.transcriber
        if transcriber is None:
            raise ValueError(f"{self.model_path} does not transcribe audio (not a Whisper checkpoint)")
        self._check_leader()
        features = transcriber.features(transcriber.samples(audio, sampling_rate))
        if transcriber.needs_detection(language):
            detected = self._run_windows([transcriber.detection_request(f) for f in features],
                                         SamplingParams(temperature=0.0, max_tokens=1))
            language_ids = [o.outputs[0].token_ids[0] for o in detected]
        else:
            language_ids = transcriber.language_ids(language, len(features))
        requests = transcriber.requests(features, language_ids, task, prompt)
        return self._run_windows(requests, sampling_params or SamplingParams(temperature=0.0, max_tokens=None))

    def _run_windows(self, requests: list[WindowRequest], params: SamplingParams) -> list[RequestOutput]:
        final = _final_only(params)
        return self._run([functools.partial(self._submit, r.prompt_ids, final, encoder_features=r.features,
                                            token_masks=r.token_masks) for r in requests])

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that changes it (cumulative text and ids, or only
        what is new with `output_kind=RequestOutputKind.DELTA`)."""
        request_id = self._add(prompt, sampling_params or SamplingParams())
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        yield output
                        if output.finished:
                            return
        finally:
            self.engine.abort_request(request_id)
