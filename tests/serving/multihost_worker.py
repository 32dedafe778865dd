"""One process of a multi-host `LLM` (tests/serving/test_multihost.py): the leader generates, the others follow.

    python -m tests.serving.multihost_worker FOLDER COORDINATOR NUM_PROCESSES PROCESS_ID

The leader prints the token ids of `run_requests` as one JSON line, then shuts the followers down.
"""

from __future__ import annotations

import json
import sys

from serving.sampling_params import SamplingParams
from tests.serving.helpers import prompts, token_prompts

# Small enough that the 30-token prompt is prefilled in chunks beside the others' decodes.
ENGINE = dict(mesh="tp", max_model_len=64, max_num_seqs=8, max_num_batched_tokens=16, page_size=4, num_pages=64, enforce_eager=True)


def run_requests(llm) -> list[list[list[int]]]:
    """Greedy prompts in one mixed prefill/decode batch, plus seeded sampling (n=2), penalties and logprobs."""
    requests = token_prompts(prompts()) + token_prompts(prompts((5, 11), seed=1))
    params = [SamplingParams(temperature=0, max_tokens=8)] * 4 + [
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, n=2, max_tokens=6),
        SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=2, max_tokens=6),
    ]
    return [[c.token_ids for c in out.outputs] for out in llm.generate(requests, params)]


def main(folder: str, coordinator: str, num_processes: str, process_id: str) -> None:
    from serving.llm import LLM

    llm = LLM(folder, coordinator_address=coordinator, num_processes=int(num_processes),
              process_id=int(process_id), **ENGINE)
    if llm.is_leader:
        print("TOKENS " + json.dumps(run_requests(llm)), flush=True)
        llm.shutdown()
    else:
        llm.follow()


if __name__ == "__main__":
    main(*sys.argv[1:])
