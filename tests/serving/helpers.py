"""Shared pieces of the serving tests: prompts and transformers' greedy reference."""

from __future__ import annotations

import numpy as np

from tests.processes import free_port
from tests.tiny_models import VOCAB

PROMPT_LENGTHS = (3, 9, 17, 30)  # crossing every tiny sliding window and several pages
MAX_TOKENS = 8


def prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(3, VOCAB, size=n).tolist() for n in lengths]


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int = MAX_TOKENS) -> list[int]:
    """transformers `generate(do_sample=False)` on one unpadded prompt; stops at EOS as configured."""
    import torch

    from tests.tiny_models import _reset_dynamic_rope

    _reset_dynamic_rope(hf_model)
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def token_prompts(prompt_ids: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in prompt_ids]


def start_server(args: list[str], timeout: float = 180, module: str = "serving.openai.cli"):
    """Start `serve` (python -m serving.openai.cli, or a `module` that wraps it) on a free 127.0.0.1 port;
    wait for its ready line.

    Returns (base URL, process, output lines so far); the caller stops the process.
    """
    import subprocess
    import sys
    import threading

    import pytest

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "serving on" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout):
        proc.kill()
        pytest.fail("server did not start:\n" + "".join(lines[-30:]))
    return f"http://127.0.0.1:{port}", proc, lines
