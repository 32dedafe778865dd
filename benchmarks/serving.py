"""Load generator for an OpenAI-compatible server, in the style of vLLM's benchmark_serving.py.

Sends `--num-prompts` streaming /v1/completions requests with random token-id
prompts (no tokenizer needed) of `--input-len` tokens asking for `--output-len`
tokens (each scaled by a random factor in [1 - range_ratio, 1 + range_ratio]),
either all at once, at a Poisson `--request-rate`, or capped by
`--max-concurrency`. Reports request and token throughput and mean / median /
p99 of TTFT (time to first token), TPOT (time per output token after the first)
and ITL (gap between streamed chunks).

    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --model MODEL \\
        --num-prompts 200 --input-len 512 --output-len 128 --max-concurrency 32 --ignore-eos
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np


@dataclass
class Result:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


async def one_request(session: aiohttp.ClientSession, args: argparse.Namespace, prompt: list[int], max_tokens: int) -> Result:
    body = {
        "model": args.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": args.ignore_eos,
    }
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    result = Result(prompt_len=len(prompt))
    start = last = time.perf_counter()
    try:
        async with session.post(f"{args.base_url}/v1/completions", json=body, headers=headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {await response.text()}"
                return result
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    result.error = event["error"]["message"]
                    return result
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                if event.get("choices"):  # one chunk per step that produced tokens (text may be empty)
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.ok = True
    except aiohttp.ClientError as e:
        result.error = repr(e)
    return result


def stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    ms = np.asarray(values) * 1000
    return f"mean {ms.mean():.1f} ms, median {np.median(ms):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms"


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)

    def scaled(n: int) -> int:
        return max(1, int(n * rng.uniform(1 - args.range_ratio, 1 + args.range_ratio)))

    work = [([rng.randrange(args.min_token_id, args.vocab_size) for _ in range(scaled(args.input_len))], scaled(args.output_len))
            for _ in range(args.num_prompts)]
    limit = asyncio.Semaphore(args.max_concurrency or len(work))
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def limited(prompt: list[int], max_tokens: int) -> Result:
            async with limit:
                return await one_request(session, args, prompt, max_tokens)

        tasks = []
        start = time.perf_counter()
        for prompt, max_tokens in work:
            tasks.append(asyncio.create_task(limited(prompt, max_tokens)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start

    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_len for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    print(f"successful requests: {len(done)} / {len(results)}" + (f" (first error: {failed[0].error})" if failed else ""))
    print(f"duration: {duration:.2f} s")
    print(f"request throughput: {len(done) / duration:.2f} req/s")
    print(f"input token throughput: {input_tokens / duration:.1f} tok/s")
    print(f"output token throughput: {output_tokens / duration:.1f} tok/s")
    print(f"TTFT: {stats([r.ttft for r in done])}")
    print(f"TPOT: {stats(tpots)}")
    print(f"ITL: {stats([x for r in done for x in r.itls])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0, help="0 for fixed lengths")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf sends all at once")
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--vocab-size", type=int, default=1000, help="random prompt ids are drawn below this")
    p.add_argument("--min-token-id", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
