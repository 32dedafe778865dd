"""Greedy generations equal transformers' token for token, for every registered architecture (CI runs the
representative rows of `CI_ARCHITECTURES`; `make test-all` all of them)."""

from __future__ import annotations

import pytest

from serving import LLM, SamplingParams
from tests.serving.helpers import MAX_TOKENS, hf_greedy, prompts, token_prompts
from tests.tiny_models import ONE_PER_ARCHITECTURE, ci_rows

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


# The recurrent models' CI rows: tests/serving/test_ssm_serving.py, through the engine under pressure.
RECURRENT = ("mamba2-groups-chunked", "granitemoehybrid-nope", "recurrentgemma-local-mqa", "qwen3_next-hybrid")


@pytest.mark.parametrize("case", ci_rows(ONE_PER_ARCHITECTURE, covered=RECURRENT))
def test_greedy_matches_transformers_batched_and_alone(case, tiny_checkpoint):
    folder, hf_model = tiny_checkpoint(case)
    prompt_ids = prompts()
    expected = [hf_greedy(hf_model, p) for p in prompt_ids]

    # Some tiny configs have fewer positions (dynamic / longrope regimes are exercised past them).
    llm = LLM(folder, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64, page_size=4, allow_long_max_model_len=True)
    together = llm.generate(token_prompts(prompt_ids), GREEDY)
    assert [o.outputs[0].token_ids for o in together] == expected
    for output, p in zip(together, prompt_ids):
        assert output.prompt_token_ids == p and output.finished
        reason = output.outputs[0].finish_reason
        assert reason == ("length" if len(output.outputs[0].token_ids) == MAX_TOKENS else "stop")

    alone = [llm.generate(token_prompts([p]), GREEDY)[0].outputs[0].token_ids for p in prompt_ids]
    assert alone == expected
    assert llm.engine.pool.all_free()
