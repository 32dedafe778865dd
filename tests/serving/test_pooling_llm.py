"""Offline pooling through `LLM` (embed, classify, score, reward, encode) against transformers / the
published reward head, batched by the `PoolingEngine`; and its fault isolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving import LLM
from serving.engine import EngineConfig
from serving.engine.pooling_engine import PoolingEngine
from serving.pooling import PoolingParams
from tests.encoder_models import LENGTHS, build_bert_tokenizer, build_encoder, build_reward, padded_inputs

TEXTS = ["the quick brown fox", "what is the capital of france?", "a cat", "the dog is a brown dog"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    ref = build_encoder("BertModel", folder, "BertConfig")
    tokenizer = build_bert_tokenizer(folder)
    # Two rows per batch at most: the four texts run as two batches of different lengths.
    return LLM(folder, max_num_seqs=2), ref, tokenizer


def _cls_normalised(ref, tokenizer, texts) -> np.ndarray:
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = ref(**encoded).last_hidden_state[:, 0].numpy()
    return cls / np.linalg.norm(cls, axis=1, keepdims=True)


def test_embed_equals_transformers_cls_pooling(bert):
    llm, ref, tokenizer = bert
    outputs = llm.embed(TEXTS)
    np.testing.assert_allclose([o.outputs.embedding for o in outputs], _cls_normalised(ref, tokenizer, TEXTS), atol=2e-6)
    assert [o.prompt_token_ids for o in outputs] == [tokenizer.encode(t) for t in TEXTS]
    raw = llm.embed(TEXTS[:1], PoolingParams(normalize=False))[0].outputs.embedding
    assert abs(np.linalg.norm(raw) - 1) > 1e-3
    assert llm.encode(TEXTS[:1])[0].outputs.data.shape == (32,)


def test_score_of_an_embedding_model_is_cosine_similarity(bert):
    llm, ref, tokenizer = bert
    scores = [o.outputs.score for o in llm.score(TEXTS[0], TEXTS[1:])]
    vectors = _cls_normalised(ref, tokenizer, TEXTS)
    np.testing.assert_allclose(scores, vectors[1:] @ vectors[0], atol=2e-6)
    with pytest.raises(ValueError, match="N with N"):
        llm.score(TEXTS[:2], TEXTS[:3])


def test_wrong_tasks_and_long_inputs_are_refused(bert):
    llm = bert[0]
    with pytest.raises(ValueError, match="pooling model .*not generate"):
        llm.generate("the fox")
    with pytest.raises(ValueError, match="serves embed, score, encode, not 'classify'"):
        llm.classify(TEXTS)
    with pytest.raises(ValueError, match="maximum input length is 64"):
        llm.embed({"prompt_token_ids": [5] * 65})
    with pytest.raises(ValueError, match="matryoshka"):
        llm.embed(TEXTS, PoolingParams(dimensions=8))


def test_a_failing_request_fails_alone(bert, monkeypatch):
    import serving.engine.pooling_engine as module

    llm = bert[0]
    real = module.task_output

    def flaky(task, params, raw):
        if raw.shape == (32,) and params.normalize is False:
            raise RuntimeError("injected")
        return real(task, params, raw)

    monkeypatch.setattr(module, "task_output", flaky)
    engine: PoolingEngine = llm.engine
    engine.add_request("bad", [2, 5, 3], PoolingParams("embed", normalize=False))
    engine.add_request("good", [2, 6, 3], PoolingParams("embed"))
    outputs = {o.request_id: o for o in engine.step()}
    assert "injected" in outputs["bad"].error and outputs["good"].error is None
    assert not engine.has_unfinished_requests()


def test_batches_keep_to_the_token_budget_and_the_warmed_shapes(bert, monkeypatch):
    config = EngineConfig(max_num_batched_tokens=32, max_num_seqs=4)
    engine = PoolingEngine(bert[0].engine.model, None, config)
    assert engine.shapes() == [(1, 8), (2, 8), (4, 8), (1, 16), (2, 16), (1, 32), (1, 64)]
    for i, n in enumerate((3, 20, 4, 4)):
        engine.add_request(str(i), [5] * n, PoolingParams("embed"))
    # 3 and 20 tokens pad to 2 x 32 > 32: the first batch is one row; then 20 (32 alone); then 4 + 4 (2 x 8).
    assert [[o.request_id for o in engine.step()] for _ in range(3)] == [["0"], ["1"], ["2", "3"]]
    ran = []
    monkeypatch.setattr(engine, "_run", lambda ids, mask, types: ran.append(ids.shape) or np.zeros((len(ids), 32)))
    lengths = np.random.RandomState(0).randint(1, 65, size=60)
    for i, n in enumerate(lengths):
        engine.add_request(f"r{i}", [5] * int(n), PoolingParams("embed"))
    while engine.has_unfinished_requests():
        engine.step()
    assert set(ran) <= set(engine.shapes()) and sum(rows for rows, _ in ran) >= len(lengths)
    small = PoolingEngine(bert[0].engine.model, None, EngineConfig(max_model_len=8, max_num_seqs=2, enforce_eager=False))
    assert small.shapes() == [(1, 8), (2, 8)] == sorted(small.compiled_shapes)  # run at start-up (warm-up on)


def test_a_new_batch_shape_near_the_map_limit_drops_compiled_programs(bert, monkeypatch, caplog):
    from serving.engine import executables

    llm, ref, tokenizer = bert
    expected = _cls_normalised(ref, tokenizer, TEXTS[:1])
    engine = llm.engine
    monkeypatch.setattr(executables, "map_limit", lambda: 1)  # every mapping is over the budget
    engine.compiled_shapes.clear()  # (earlier tests ran its shapes): the next batch counts as new
    with caplog.at_level("WARNING", logger=executables.__name__):
        outputs = llm.embed(TEXTS[:1])
    assert "dropped JAX's compiled programs" in caplog.text and len(engine.compiled_shapes) == 1
    np.testing.assert_allclose([outputs[0].outputs.embedding], expected, atol=2e-6)


@pytest.mark.parametrize("labels", [1, 3])
def test_classify_and_cross_encoder_scores_equal_transformers(tmp_path, labels):
    ref = build_encoder("BertForSequenceClassification", tmp_path, "BertConfig", num_labels=labels)
    tokenizer = build_bert_tokenizer(tmp_path)
    llm = LLM(tmp_path)
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = ref(**encoded).logits.numpy()
    probs = [o.outputs.probs for o in llm.classify(TEXTS)]
    expected = 1 / (1 + np.exp(-logits)) if labels == 1 else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=2e-6)
    if labels != 1:
        with pytest.raises(ValueError, match="one label"):
            llm.score(TEXTS[0], TEXTS[1:])
        return
    pairs = tokenizer([TEXTS[0]] * 3, TEXTS[1:], padding=True, return_tensors="pt")  # token types 0 / 1
    with torch.no_grad():
        pair_logits = ref(**pairs).logits.numpy()[:, 0]
    scores = [o.outputs.score for o in llm.score(TEXTS[0], TEXTS[1:])]
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-pair_logits)), atol=2e-6)


@pytest.mark.parametrize("architecture", ["Qwen2ForRewardModel", "Qwen2ForProcessRewardModel"])
def test_reward_equals_the_published_head(tmp_path, architecture):
    ref = build_reward(architecture, tmp_path)
    llm = LLM(tmp_path)
    ids, mask, _ = padded_inputs(seed=2)
    outputs = llm.reward([{"prompt_token_ids": ids[i, :n].tolist()} for i, n in enumerate(LENGTHS)])
    with torch.no_grad():
        expected = ref(torch.as_tensor(ids).long(), torch.as_tensor(mask).long()).numpy()
    for row, (output, n) in enumerate(zip(outputs, LENGTHS)):
        want = expected[row, :n]
        if architecture == "Qwen2ForProcessRewardModel":  # reported as probabilities of its two labels
            want = np.exp(want) / np.exp(want).sum(-1, keepdims=True)
        np.testing.assert_allclose(output.outputs.data, want, atol=2e-6)


def test_pooling_on_a_generative_model_is_refused(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3-qknorm")
    with pytest.raises(ValueError, match="needs a pooling model"):
        LLM(folder, max_model_len=32).embed(["hello"])


def test_a_generative_model_embeds_and_generates_through_one_engine(tiny_checkpoint):
    from serving.engine.combined import GenerationWithPooling
    from serving.sampling_params import SamplingParams
    from tests.serving.helpers import hf_greedy, prompts

    folder, hf = tiny_checkpoint("qwen3-qknorm")
    llm = LLM(folder, max_model_len=64, enable_embeddings=True)
    engine: GenerationWithPooling = llm.engine
    gen_prompts, embed_prompts = prompts((3, 9, 17)), prompts((4, 11, 6, 20), seed=1)
    for i, p in enumerate(gen_prompts):
        engine.add_request(f"g{i}", p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for i, p in enumerate(embed_prompts):
        engine.add_request(f"e{i}", p, PoolingParams("embed"))
    done: dict[str, tuple[int, object]] = {}
    step = 0
    while engine.has_unfinished_requests():
        step += 1
        for output in engine.step():
            if output.finished:
                done[output.request_id] = (step, output)
    # The embeddings did not wait for the generation to drain, nor did generation wait for them.
    assert max(done[f"e{i}"][0] for i in range(4)) < min(done[f"g{i}"][0] for i in range(3))
    for i, p in enumerate(gen_prompts):
        assert done[f"g{i}"][1].outputs[0].token_ids == hf_greedy(hf, p, 8)
    for i, p in enumerate(embed_prompts):
        with torch.no_grad():
            last = hf.model(input_ids=torch.tensor([p])).last_hidden_state[0, -1].numpy()
        np.testing.assert_allclose(done[f"e{i}"][1].outputs.embedding, last / np.linalg.norm(last), atol=2e-5)
    assert llm.embed(["hello"])[0].outputs.hidden_size == hf.config.hidden_size
