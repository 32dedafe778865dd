"""Time from starting `serve` to its first answer, on a first start (empty compilation cache) and a second.

Each run starts `python -m serving.openai.cli` with the given flags and a fresh
`--compilation-cache-dir` (kept for the second start), waits for the ready line,
sends one short completion (greedy, 8 tokens) and stops the server.

    python -m benchmarks.serve_startup [-- serve flags...]      # default model, default flags
    python -m benchmarks.serve_startup --dry-run                # only checks the arguments
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_answer_seconds(serve_args: list[str], cache_dir: str, timeout: float) -> dict:
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "serving.openai.cli", "--port", str(port),
                             "--compilation-cache-dir", cache_dir, *serve_args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "serving on" in line:
                break
            if time.perf_counter() - start > timeout:
                raise TimeoutError("serve did not start in time")
        else:
            raise RuntimeError(f"serve exited with {proc.wait()}")
        ready = time.perf_counter() - start
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=timeout) as response:
            model = json.loads(response.read())["data"][0]["id"]
        body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = json.loads(response.read())["choices"][0]["text"]
        return {"ready_s": round(ready, 1), "first_answer_s": round(time.perf_counter() - start, 1), "text": text}
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("serve_args", nargs="*", help="flags for serve (after --)")
    args = p.parse_args(argv)
    if args.dry_run:
        return {"serve_args": args.serve_args}
    result: dict = {"serve_args": args.serve_args}
    with tempfile.TemporaryDirectory() as cache:
        for run in ("first_start", "second_start"):
            result[run] = first_answer_seconds(args.serve_args, cache, args.timeout)
            print(run, result[run], flush=True)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
