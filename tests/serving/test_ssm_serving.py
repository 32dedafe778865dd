"""Mamba, Mamba-2 and RecurrentGemma through `LLM.generate` under scheduling pressure: mixed prefill/decode batches,
prefill chunks continuing from a slot's state, and preemption (recompute from token 0), unrolled and
with the layer stack scanned (recurrent pools stacked `[L, slots, ...]`), and beside attention layers; and through
the Pallas state kernels on the interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from serving import LLM, SamplingParams
from tests.serving.helpers import prompts, token_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


# Mamba unrolled (the CPU default), Mamba-2 scanned (the accelerator default), GraniteMoeHybrid and
# Qwen3-Next with paged KV and recurrent pools side by side; RecurrentGemma scanned (its two recurrent
# layers stacked) beside sliding-window attention; test_generate_parity runs each unrolled without pressure.
@pytest.mark.parametrize(
    "case, scan_layers",
    [("mamba-tied", False), ("mamba2-groups-chunked", True), ("granitemoehybrid-nope", False),
     ("recurrentgemma-local-mqa", True), ("qwen3_next-hybrid", False)],
)
def test_greedy_under_pressure_matches_transformers(case, scan_layers, tiny_checkpoint):
    folder, hf_model = tiny_checkpoint(case)
    prompt_ids = prompts((3, 9, 17, 26), seed=7)
    import torch

    with torch.no_grad():
        expected = [hf_model.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                      pad_token_id=0)[0, len(p):].tolist() for p in prompt_ids]
    # 12 pages of 4 tokens cannot hold the four sequences at once (preemption); 16 tokens a
    # step split the long prompts into chunks beside the others' decode tokens.
    llm = LLM(folder, max_model_len=40, num_pages=12, page_size=4, max_num_batched_tokens=16, max_num_seqs=4,
              scan_layers=scan_layers)
    engine = llm.engine
    assert not engine.pool.enable_prefix_caching  # recurrent state: pages alone cannot restore a prefix
    outputs = llm.generate(token_prompts(prompt_ids), GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.pool.all_free()


# CPU serving takes the references; here the mixers' ops are forced onto the Pallas kernels on the interpreter,
# so the engine's prefill chunks continue from the slots' states through the state kernels:
# family -> (HF config overrides, the op's package and name). Qwen3-Next with value heads of 32, the Mamba-2
# families with heads of 32 and a state of 16 or 32 (whole kernel tiles; the table's are below a Triton tile).
# Mamba-2 with one group of B/C, Granite with two: with two groups and a state of 16, both models' greedy
# continuations reach token 2 (EOS), which `min_new_tokens` keeps transformers from picking.
INTERPRETED = {"mamba-tied": ({}, "pallas_kernels.ssm", "selective_scan"),
               "qwen3_next-hybrid": (dict(linear_value_head_dim=32), "pallas_kernels.gated_delta", "gated_delta"),
               "recurrentgemma-local-mqa": ({}, "pallas_kernels.rglru", "rg_lru"),
               "mamba2-groups-chunked": (dict(num_heads=4, head_dim=32, state_size=16, n_groups=1),
                                         "pallas_kernels.ssm", "ssd_chunked_states"),
               "granitemoehybrid-nope": (dict(mamba_d_state=32), "pallas_kernels.ssm", "ssd_chunked_states")}


# (About 30 s, 55 s, 12 s, 30 s and 40 s on CPU.)
@pytest.mark.parametrize("case", ["mamba-tied", pytest.param("qwen3_next-hybrid", marks=pytest.mark.slow),
                                  "recurrentgemma-local-mqa", "mamba2-groups-chunked",
                                  pytest.param("granitemoehybrid-nope", marks=pytest.mark.slow)])
def test_greedy_under_pressure_through_interpreted_state_kernels(case, tmp_path, monkeypatch):
    import dataclasses
    import importlib
    import inspect

    import torch

    from tests.tiny_models import CASES_BY_NAME, build_checkpoint

    overrides, package, name = INTERPRETED[case]
    tiny = CASES_BY_NAME[case]
    hf_model = build_checkpoint(dataclasses.replace(tiny, overrides={**tiny.overrides, **overrides}), tmp_path)
    module, with_states = importlib.import_module(package), []
    op = getattr(module, name)

    def interpreted(*args, **kwargs):
        with_states.append(inspect.signature(op).bind(*args, **kwargs).arguments.get("initial") is not None)
        return op(*args, **kwargs, implementation="interpret")

    monkeypatch.setattr(module, name, interpreted)
    prompt_ids = prompts((3, 9, 17, 26), seed=7)
    expected, expected_logprobs = [], []
    with torch.no_grad():
        for p in prompt_ids:
            out = hf_model.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                    pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            tokens = out.sequences[0, len(p):].tolist()
            expected.append(tokens)
            expected_logprobs.append([torch.log_softmax(step[0].float(), -1)[t].item()
                                      for step, t in zip(out.logits, tokens)])
    llm = LLM(tmp_path, max_model_len=40, num_pages=12, page_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    outputs = llm.generate(token_prompts(prompt_ids), dataclasses.replace(GREEDY, logprobs=0))
    assert [o.outputs[0].token_ids for o in outputs] == expected
    # Tiny random models repeat their argmax whatever the state; the log-probs see a state the kernel lost.
    for output, tokens, want in zip(outputs, expected, expected_logprobs):
        got = [step[t].logprob for step, t in zip(output.outputs[0].logprobs, tokens)]
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert llm.engine.scheduler.num_preemptions > 0
    assert with_states and all(with_states)
