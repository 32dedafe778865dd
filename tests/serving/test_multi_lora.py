"""Many LoRA adapters in one served batch: each request equals its adapter merged into the base model.

Four adapters (ours and PEFT-made; different ranks, targets, rsLoRA) and the base model share
one batch; every request's greedy tokens are those of the merged model (teacher-forced through
one dense forward), and its logprobs match the merged model's log-softmax. Prefix-cache pages
are shared only under the same adapter. The slot rules (unload while in use, full slots, rank
and target limits) are checked on the manager, and the OpenAI server test loads, unloads and
serves adapters (one written by `train` while the server runs) with requests in flight.
"""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

import model_lib
from model_lib.lora import LoraConfig, apply_lora, load_peft_adapter, merge_lora, save_peft_adapter
from serving import LLM, LoRARequest, SamplingParams
from serving.lora import LoRAManager
from tests.serving.helpers import start_server
from tests.training.test_lora import _randomise_b

BASE = "llama-gqa"
MAX_LEN = 48  # dense reference length: prompt + generated tokens fit
GEN = 8
SERVER_GEN = 48  # long enough that unloading lands while the requests run
PREFIX = list(range(40, 56))  # one full 16-token page shared by every prompt
# Equal lengths: the requests of a batch finish together, so every step has one of two shapes.
TAILS = [np.random.RandomState(seed).randint(3, 128, size=8).tolist() for seed in range(10)]
# name -> (rank, alpha, targets, rsLoRA); "peft" is made by PEFT itself.
OURS = {
    "qv": (4, 8, ["q_proj", "v_proj"], False),
    "all": (8, 16, "all-linear", True),
    "mlp": (8, 8, ["k_proj", "gate_proj", "up_proj"], False),
}


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    """name -> PEFT folder, for four adapters of the tiny Llama."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    folder, hf_model = tiny_checkpoint(BASE)
    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for seed, (name, (rank, alpha, targets, rslora)) in enumerate(OURS.items()):
        model = model_lib.from_pretrained(folder)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora)
        apply_lora(model, config, seed=seed)
        _randomise_b(model, seed)
        save_peft_adapter(model, config, root / name, str(folder))
        paths[name] = root / name
    torch.manual_seed(3)
    peft_model = get_peft_model(hf_model, PeftLoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(root / "peft")
    peft_model.unload()
    paths["peft"] = root / "peft"
    return folder, paths


def merged_log_probs(folder, adapter, sequences: list[list[int]], forward) -> np.ndarray:
    """log-softmax of the merged model (base + `adapter`, or the base for None) over right-padded rows."""
    model = model_lib.from_pretrained(folder)
    if adapter is not None:
        load_peft_adapter(model, adapter)
        merge_lora(model)
    ids = np.zeros((len(sequences), MAX_LEN), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
    logits = forward(model, jnp.asarray(ids), jnp.ones_like(ids))  # causal: right padding changes nothing before it
    return np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float32), axis=-1))


def check_against_merged(folder, adapter, prompt: list[int], output, forward) -> None:
    tokens = list(output.token_ids)
    log_probs = merged_log_probs(folder, adapter, [prompt + tokens], forward)[0]
    rows = log_probs[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    assert rows.argmax(-1).tolist() == tokens
    ours = [entry[token].logprob for entry, token in zip(output.logprobs, tokens)]
    np.testing.assert_allclose(ours, rows[np.arange(len(tokens)), tokens], atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def llm(adapters):
    folder, _ = adapters
    # Five prompts' prefill in one 128-token step, their decodes in 8-token steps: two compiled shapes.
    return LLM(folder, enable_lora=True, max_loras=4, max_lora_rank=8, max_model_len=MAX_LEN, num_pages=64,
               max_num_seqs=8, max_num_batched_tokens=128)


def test_four_adapters_in_one_batch_equal_their_merged_models(llm, adapters, forward):
    folder, paths = adapters
    names = [*OURS, "peft"]
    prompts = [PREFIX + tail for tail in TAILS[:5]]
    params = SamplingParams(temperature=0, max_tokens=GEN, ignore_eos=True, logprobs=0)
    requests = [LoRARequest(name, i + 1, str(paths[name])) for i, name in enumerate(names)] + [None]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=requests)
    base_tokens = outputs[-1].outputs[0].token_ids
    for prompt, request, out in zip(prompts, requests, outputs):
        check_against_merged(folder, paths[request.lora_name] if request else None, prompt, out.outputs[0], forward)
    # Every adapter changes the model: with the base model's prompt, each gives other tokens.
    swapped = llm.generate([{"prompt_token_ids": prompts[-1]}] * 5, params, lora_request=requests)
    assert all(out.outputs[0].token_ids != base_tokens for out in swapped[:4])

    # The shared prefix page is reused under the same adapter, never across adapters: rotated, every
    # request must still equal its own merged model.
    pool = llm.engine.pool
    hits = pool.prefix_hits
    rotated = requests[1:] + requests[:1]
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=rotated)
    assert pool.prefix_hits > hits
    for prompt, request, out in zip(prompts, rotated, again):
        check_against_merged(folder, paths[request.lora_name] if request else None, prompt, out.outputs[0], forward)


def test_slots_limits_and_unloading_in_use(llm, adapters, tmp_path, forward):
    folder, paths = adapters
    lora = llm.engine.lora
    for name in list(lora.adapters):
        lora.unload(name)
    with pytest.raises(ValueError, match=r"max_loras must be in \[1, 64\]"):
        LoRAManager(lora.model, max_loras=65, max_lora_rank=8)
    with pytest.raises(ValueError, match=r"max_lora_rank must be in \[1, 512\]"):
        LoRAManager(lora.model, max_loras=1, max_lora_rank=0)
    wide = model_lib.from_pretrained(folder)
    config = LoraConfig(r=16, target_modules=["q_proj"])
    apply_lora(wide, config)
    save_peft_adapter(wide, config, tmp_path / "wide", str(folder))
    with pytest.raises(ValueError, match="rank 16, above max_lora_rank=8"):
        lora.load("wide", tmp_path / "wide")
    head = model_lib.from_pretrained(folder)
    config = LoraConfig(r=2, target_modules=["lm_head"])
    apply_lora(head, config)
    save_peft_adapter(head, config, tmp_path / "head", str(folder))
    with pytest.raises(ValueError, match=r"targets \['lm_head'\], which served adapters do not support"):
        lora.load("head", tmp_path / "head")
    for name in [*OURS, "peft"]:
        lora.load(name, paths[name])
    with pytest.raises(ValueError, match="all max_loras=4 adapter slots are taken"):
        lora.load("qv2", paths["qv"])
    with pytest.raises(ValueError, match="already loaded"):
        lora.load("qv", paths["qv"])

    # Unloading an adapter that a running request uses: the name goes at once, the slot (and its
    # weights) when the request leaves; the request completes on its adapter.
    params = SamplingParams(temperature=0, max_tokens=GEN, ignore_eos=True, logprobs=0)
    prompts = [PREFIX + tail for tail in TAILS[5:]]  # new to the prefix cache: the same step shapes
    running = ["qv", "qv", "all", "mlp", None]
    for i, (prompt, name) in enumerate(zip(prompts, running)):
        llm.engine.add_request(f"r{i}", prompt, params, lora_name=name)
    llm.engine.step()
    slot = lora.adapters["qv"].slot
    lora.unload("qv")
    with pytest.raises(ValueError, match="no LoRA adapter named 'qv'"):
        llm.engine.add_request("s", prompts[0], params, lora_name="qv")
    with pytest.raises(ValueError, match="slots are taken"):
        lora.load("qv2", paths["qv"])
    finished = {}
    while llm.engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in llm.engine.step() if o.finished)
    assert lora.users(slot) == 0 and sorted(finished) == [f"r{i}" for i in range(5)]
    for i in (0, 1):
        check_against_merged(folder, paths["qv"], prompts[i], finished[f"r{i}"].outputs[0], forward)
    lora.load("qv2", paths["qv"])  # the freed slot is taken again
    assert lora.adapters["qv2"].slot == slot
    with pytest.raises(KeyError, match="no LoRA adapter named 'qv'"):
        lora.unload("qv")


# -- the OpenAI server ------------------------------------------------------------------------

def post(base: str, path: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def complete(base: str, model: str, prompt: list[int], max_tokens: int) -> tuple[int, dict | str]:
    status, text = post(base, "/v1/completions", dict(model=model, prompt=prompt, max_tokens=max_tokens,
                                                      temperature=0, ignore_eos=True))
    return status, json.loads(text) if status == 200 else text


@pytest.mark.xdist_group("multi_lora_server")
def test_server_loads_and_unloads_adapters_while_requests_run(adapters, tmp_path):
    from training.config import TrainConfig
    from training.trainer import train

    folder, paths = adapters
    base, proc, lines = start_server(
        [str(folder), "--served-model-name", "base", "--enable-lora", "--lora-modules", f"qv={paths['qv']}",
         f"peft={paths['peft']}", "--max-loras", "2", "--max-lora-rank", "8", "--max-model-len", "96",
         "--max-num-seqs", "4", "--allow-runtime-lora-updating", "--log-level", "warning"])
    try:
        with urllib.request.urlopen(base + "/v1/models", timeout=30) as response:
            cards = json.loads(response.read())["data"]
        assert [c["id"] for c in cards] == ["base", "qv", "peft"] and cards[1]["parent"] == "base"
        status, text = complete(base, "nope", PREFIX, 2)
        assert status == 404 and "`nope` does not exist" in text

        prompt = PREFIX + TAILS[1]
        _, alone = complete(base, "qv", prompt, SERVER_GEN)  # what qv gives with nothing else going on
        results: dict[int, tuple[str, str]] = {}
        started = [threading.Event() for _ in range(4)]

        def run(i: int, model: str) -> None:
            client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            text, reason = "", None
            for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=SERVER_GEN, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True}):
                started[i].set()
                if chunk.choices:
                    text, reason = text + chunk.choices[0].text, chunk.choices[0].finish_reason or reason
            results[i] = (text, reason)

        threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate(["qv", "qv", "peft", "base"])]
        for t in threads:
            t.start()
        assert all(event.wait(120) for event in started)  # every request runs before qv is unloaded
        assert post(base, "/v1/unload_lora_adapter", {"lora_name": "qv"}) == (
            200, "Success: LoRA adapter 'qv' removed successfully.")
        assert complete(base, "qv", prompt, 2)[0] == 404
        assert post(base, "/v1/unload_lora_adapter", {"lora_name": "qv"})[0] == 404
        status, text = post(base, "/v1/load_lora_adapter", {"lora_name": "all", "lora_path": str(paths["all"])})
        assert status == 400 and "slots are taken" in text  # qv's slot stays while its requests run
        for t in threads:
            t.join(120)
        assert sorted(results) == [0, 1, 2, 3] and all(reason == "length" for _, reason in results.values())
        assert results[0][0] == results[1][0] == alone["choices"][0]["text"]  # on qv's weights to the end

        # An adapter written by `train` while the server runs, loaded into qv's freed slot and served.
        train(TrainConfig(model_name_or_path=str(folder), training_data_path=str(write_data(tmp_path)),
                          output_dir=str(tmp_path / "trained"), peft_method="lora", lora_r=8, lora_alpha=16,
                          lora_dropout=0.0, target_modules=["q_proj", "o_proj"], max_steps=1,
                          per_device_train_batch_size=4, max_seq_length=16, torch_dtype="float32",
                          progress_bar=False))
        trained = {"lora_name": "trained", "lora_path": str(tmp_path / "trained")}
        assert post(base, "/v1/load_lora_adapter", trained) == (200, "Success: LoRA adapter 'trained' added successfully.")
        assert post(base, "/v1/load_lora_adapter", trained)[0] == 400  # the name is taken
        status, body = complete(base, "trained", prompt, 4)
        assert status == 200 and body["model"] == "trained" and body["usage"]["completion_tokens"] == 4
        with urllib.request.urlopen(base + "/v1/models", timeout=30) as response:
            assert [c["id"] for c in json.loads(response.read())["data"]] == ["base", "peft", "trained"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def write_data(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": w + ">", "output": w[::-1]}) + "\n" for w in ["abc", "bca", "cab", "acb"]))
    return data


def test_serve_lora_flags():
    from serving.openai.cli import parse_args

    args = parse_args(["m", "--enable-lora", "--lora-modules", "a=/x/a", '{"name": "b", "path": "/x/b"}',
                       "--max-loras", "2"])
    assert args.lora_modules == [("a", "/x/a"), ("b", "/x/b")] and args.max_loras == 2 and args.max_lora_rank == 16
    for bad in (["m", "--lora-modules", "a=/x/a"], ["m", "--enable-lora", "--lora-modules", "no-path"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
