"""`/v1/completions` of an encoder-decoder (tiny BART; the prompt is the encoder's input) equals
transformers' greedy `generate`; a source too long for the encoder is the request's 400, and a source does not
count against the decoder's max_model_len."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.seq2seq_models import build_seq2seq
from tests.serving.test_pooling_server import serve_in_thread
from tests.tiny_models import build_tokenizer

PROMPTS = ["hello there", "a b c d e f"]


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bart-server")
    reference = build_seq2seq("BartForConditionalGeneration", folder)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    with serve_in_thread(folder) as server:
        yield server, reference, tokenizer


def test_openai_client_completions_equal_transformers(bart):
    server, reference, tokenizer = bart
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="none", max_retries=0)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            tokens = reference.generate(input_ids=torch.tensor([ids]), do_sample=False, num_beams=1,
                                        max_new_tokens=8)[0, 1:].tolist()
        response = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        assert response.choices[0].text == tokenizer.decode(tokens, skip_special_tokens=True)
        assert response.usage.prompt_tokens == len(ids)
        assert response.usage.completion_tokens == len(tokens)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        client.completions.create(model="tiny", prompt=[5] * 65, max_tokens=4)
    # A 60-token source and 8 new tokens: only the decoder's tokens count against max_model_len (64).
    long = client.completions.create(model="tiny", prompt=[5] * 60, max_tokens=8, temperature=0)
    assert long.usage.prompt_tokens == 60 and long.usage.completion_tokens >= 1
