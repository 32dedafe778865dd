"""Config fuzz: keys that other families use mean nothing to a class that ignores them.

For every registered architecture (walked from the registry, so a new one is
covered as soon as it is registered) the test starts from that architecture's
tiny case, adds stray keys of other families with values that would change the
logits if wrongly obeyed, builds the transformers model from the modified config,
saves it, loads it with `model_lib.from_pretrained` and compares float32 logits
over a sequence longer than any window. transformers is the ground truth: a key
its class reads is obeyed by both sides, one it ignores by neither.

Two cases per architecture: every stray key at once, and a seeded half of them
(so that e.g. `sliding_window` also comes without `use_sliding_window`).

Remote-code families (no transformers class: InternLM 1/2, Baichuan, Qwen 1,
ChatGLM, DeciLM) are written by tests/remote_layouts.py or their own builder from
a native reference that cannot see the stray keys; there the keys go into the
remote config.json afterwards, restricted to those the published remote code never
reads (`REMOTE_CODE_READS` lists the stray keys each one does read), and the
reference is the unmodified native model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import zlib
from typing import Any

import numpy as np
import pytest

import model_lib
from model_lib.registry import ARCHITECTURES, get_family
from tests.tiny_models import CASES, CI_ARCHITECTURES, ONE_PER_ARCHITECTURE, TinyCase, assert_logits_close, build_checkpoint, hf_logits, random_ids

FUZZ_LEN = 19  # longer than every sliding window below and in the tiny table
ALTERNATING = object()  # layer_types: sliding, full, sliding, ... for the case's layer count

# Keys of other families, each with a value that changes the logits when obeyed, in
# groups that the half case draws as one (a checkpoint that lists sliding layers also
# turns the window on; the bias keys are aliases of each other in some configs).
STRAY_GROUPS: list[dict[str, Any]] = [
    {"sliding_window": 6},
    {"use_sliding_window": True, "max_window_layers": 1, "layer_types": ALTERNATING},
    {"sliding_window_pattern": 2},
    {"head_dim": 32},
    {"partial_rotary_factor": 0.5},
    {"rotary_pct": 0.5},
    {"rotary_dim": 4},
    {"rope_theta": 500.0},
    {"rotary_emb_base": 500.0},
    {"attention_bias": True, "mlp_bias": True, "bias": True, "use_bias": True, "qkv_bias": True},
    {"lm_head_bias": True},
    {"use_qk_norm": True},
    {"qk_layernorm": True},
    {"rms_norm_eps": 0.3},
    {"layer_norm_eps": 0.3},
    {"layer_norm_epsilon": 0.3},
    {"norm_eps": 0.3},
    {"norm_epsilon": 0.3},
    {"attn_logit_softcapping": 2.0},
    {"final_logit_softcapping": 3.0},
    {"query_pre_attn_scalar": 7},
    {"embedding_multiplier": 3.0},
    {"residual_multiplier": 0.5},
    {"attention_multiplier": 0.2},
    {"logits_scaling": 2.0},
    {"scale_emb": 3.0},
    {"scale_depth": 2.0},
    {"dim_model_base": 16},
    {"logit_scale": 0.5},
    {"clip_qkv": 0.05},
    {"parallel_attn": True},
    {"use_parallel_residual": True},
    {"hidden_act": "relu"},
    {"hidden_activation": "relu"},
    {"activation_function": "relu"},
]
STRAY_KEYS = [key for group in STRAY_GROUPS for key in group]

# Stray keys that the transformers class itself cannot run with (no ground truth), or
# that we refuse by name on purpose.
NO_GROUND_TRUTH: dict[str, set[str]] = {
    # The attention sizes heads by hidden_size / heads, the rotary or q/k norm by head_dim: shapes clash.
    "DbrxForCausalLM": {"head_dim"},
    "Phi3ForCausalLM": {"head_dim"},
    "PhiForCausalLM": {"head_dim"},
    # A read-only property of the config class.
    "FalconForCausalLM": {"head_dim"},
    "MambaForCausalLM": {"layer_types"},
    "Mamba2ForCausalLM": {"layer_types"},
    # layer_types maps onto the read-only layers_block_type (derived from block_types).
    "RecurrentGemmaForCausalLM": {"layer_types"},
    # Rotary of partial width built, but applied to the whole head: shapes clash.
    "Gemma3ForCausalLM": {"partial_rotary_factor"},
    "GptOssForCausalLM": {"partial_rotary_factor"},
    # logits_scaling: a read-only property of the config class.
    "MiniCPM3ForCausalLM": {"logits_scaling", "partial_rotary_factor"},
    # YaRN sizes its rotary by partial_rotary_factor, the rope part of the head does not: shapes clash.
    # DeepseekV3Config lets a stray head_dim overwrite the qk_rope_head_dim it sets: the same clash.
    "DeepseekV2ForCausalLM": {"partial_rotary_factor"},
    "DeepseekV3ForCausalLM": {"head_dim", "partial_rotary_factor"},
    "PhimoeForCausalLM": {"head_dim", "partial_rotary_factor"},
    # MosaicML's own code applies logit_scale, transformers' MPT not: refused by name (model_lib/families/mpt.py).
    "MptForCausalLM": {"logit_scale"},
    # transformers' Llama 4 builds masks for full and chunked layers only (a sliding layer is a KeyError);
    # we refuse other layer types by name.
    "Llama4ForCausalLM": {"layer_types"},
}

# Stray keys that a remote-code family's published modeling/config code does read
# (kept out of its fuzz: no native reference can follow them).
REMOTE_CODE_READS: dict[str, set[str]] = {
    "internlm": {"bias", "rms_norm_eps", "hidden_act"},
    "internlm2": {"bias", "rms_norm_eps", "hidden_act", "rope_theta"},
    "baichuan": {"rms_norm_eps", "hidden_act"},
    "qwen": {"layer_norm_epsilon", "rotary_pct", "rotary_emb_base"},
    "chatglm": set(),
    # Llama-derived remote code: Llama's keys (and head_dim, read by later Llama copies).
    "deci": {"attention_bias", "mlp_bias", "rms_norm_eps", "hidden_act", "rope_theta", "head_dim"},
    # hpcai-tech's Grok-1 port: fixed rotary base, GELU and head size; Arctic: Mistral-derived
    # attention (its sliding_window is refused by name) with Llama's keys.
    "grok1": {"rms_norm_eps"},
    "arctic": {"rms_norm_eps", "hidden_act", "rope_theta", "sliding_window"},
    # SDAR's Qwen3 keys; it stores use_sliding_window / sliding_window but its attention never applies them.
    "sdar": {"attention_bias", "rms_norm_eps", "hidden_act", "rope_theta", "head_dim"},
}


def _start_case(architecture: str) -> TinyCase:
    cases = [c for c in CASES if c.hf_architecture() == architecture]
    if not cases:
        raise AssertionError(f"{architecture} is registered but has no tiny case in tests/tiny_models.py to fuzz from")
    preferred = [c for c in cases if c.name in ONE_PER_ARCHITECTURE]
    return (preferred or cases)[0]


def _stray_keys(case: TinyCase, architecture: str, subset: bool) -> dict[str, Any]:
    """The stray keys for `case`: all groups, or a seeded half of them, less the keys the case sets itself."""
    groups = STRAY_GROUPS
    if subset:
        rng = random.Random(zlib.crc32(case.name.encode()))
        groups = [g for g in groups if rng.random() < 0.5]
    own = {**case.dims, **case.overrides}
    skip = set(own) | NO_GROUND_TRUTH.get(architecture, set())
    layers = case.hf_config().get_text_config().num_hidden_layers
    keys = {}
    for group in groups:
        for key, value in group.items():
            if key not in skip:
                keys[key] = _alternating(layers) if value is ALTERNATING else copy.deepcopy(value)
    return keys


def _alternating(layers: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


FUZZ = [(architecture, subset) for architecture in sorted(ARCHITECTURES) for subset in (False, True)]


def _fuzz_row(architecture: str, subset: bool):
    """Every architecture's all-keys case runs in CI; the half cases of the representative ones
    (`CI_ARCHITECTURES`), the others with the slow rows."""
    ci = not subset or _start_case(architecture).name in CI_ARCHITECTURES
    return pytest.param(architecture, subset, id=f"{architecture}-{'half' if subset else 'all'}",
                        marks=() if ci else pytest.mark.slow)


@pytest.mark.parametrize("architecture, subset", [_fuzz_row(a, s) for a, s in FUZZ])
def test_stray_config_keys_match_transformers(architecture, subset, tmp_path, forward):
    case = _start_case(architecture)
    family = get_family(architecture)
    stray = _stray_keys(case, architecture, subset)
    options: dict[str, Any] = {}
    if family.remote_code:
        if family.name not in REMOTE_CODE_READS:
            pytest.fail(f"remote-code family {family.name}: list the stray keys its remote code reads in REMOTE_CODE_READS")
        hf_model = build_checkpoint(case, tmp_path)
        config = json.loads((tmp_path / "config.json").read_text())
        stray = {k: v for k, v in stray.items() if k not in REMOTE_CODE_READS[family.name] and k not in config}
        (tmp_path / "config.json").write_text(json.dumps({**config, **stray}))
    else:
        hf_model = build_checkpoint(dataclasses.replace(case, overrides={**stray, **case.overrides}), tmp_path)
        # Without a cache: transformers' cache reads a stray `layer_types` even where the class does not.
        options = dict(use_cache=False)

    assert stray, f"no stray key left to add to {case.name}"

    model = model_lib.from_pretrained(tmp_path)
    ids = random_ids(1, FUZZ_LEN, seed=7)
    assert_logits_close(forward(model, ids, np.ones_like(ids)), hf_logits(hf_model, ids, **options))
