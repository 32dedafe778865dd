"""One process of a multi-host `LLM` (tests/serving/test_multihost.py): the leader generates, the others follow.

    python -m tests.serving.multihost_worker FOLDER COORDINATOR NUM_PROCESSES PROCESS_ID

The leader prints the token ids of `run_requests` as one JSON line, then shuts the followers down.
"""

from __future__ import annotations

import json
import sys

from serving.sampling_params import SamplingParams
from tests.serving.helpers import prompts, token_prompts

# The 16-token budget prefills the short prompts and the long prompt's first chunk in step 1, the rest of it
# beside their first decodes in step 2 (a mixed batch); it starts one step late and stops one token early,
# so every sequence ends in the same step: few step shapes to compile.
ENGINE = dict(mesh="tp", max_model_len=64, max_num_seqs=8, max_num_batched_tokens=16, page_size=16, num_pages=32,
              enforce_eager=True)
MAX_TOKENS = 8


def run_requests(llm) -> list[list[list[int]]]:
    """Greedy prompts, seeded sampling (n=2) and penalties with logprobs, in one continuous batch; token ids."""
    short, long = prompts((3, 4, 3), seed=0), prompts((13,), seed=1)
    params = [
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, n=2, max_tokens=MAX_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=2, max_tokens=MAX_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS - 1, ignore_eos=True),
    ]
    return [[c.token_ids for c in out.outputs] for out in llm.generate(token_prompts(short + long), params)]


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
