"""Tiny hidden-state-fed drafts built at test time: an EAGLE-3 head in the published layout, and
DeepSeek-V3 / GLM-4.5 checkpoints carrying their MTP block."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file


def build_eagle3_checkpoint(folder: Path, target_config: dict, *, draft_vocab: int, aux_layers: list[int],
                            seed: int = 0, own_embeddings: bool = False) -> dict[str, np.ndarray]:
    """An EAGLE-3 head for a target with `target_config` (its config.json), as SpecForge saves one: a
    `LlamaForCausalLMEagle3` config, `fc`, `midlayer.*`, `norm`, `lm_head [V_d, E]`, `d2t`, `t2d`."""
    rng = np.random.RandomState(seed)
    hidden, vocab = target_config["hidden_size"], target_config["vocab_size"]
    heads, kv_heads, head_dim, inner = 4, 2, hidden // 4, 96
    config = dict(architectures=["LlamaForCausalLMEagle3"], model_type="llama", hidden_size=hidden,
                  intermediate_size=inner, num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  vocab_size=vocab, draft_vocab_size=draft_vocab, max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False, torch_dtype="float32",
                  eagle_aux_hidden_state_layer_ids=aux_layers)

    def w(*shape: int, std: float = 0.1) -> np.ndarray:
        return (rng.randn(*shape) * std).astype(np.float32)

    tensors = {
        "fc.weight": w(hidden, 3 * hidden),
        "midlayer.self_attn.q_proj.weight": w(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": w(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": w(inner, hidden),
        "midlayer.mlp.up_proj.weight": w(inner, hidden),
        "midlayer.mlp.down_proj.weight": w(hidden, inner),
        "norm.weight": 1 + w(hidden),
        "lm_head.weight": w(draft_vocab, hidden, std=0.3),
    }
    for norm in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        tensors[f"midlayer.{norm}.weight"] = 1 + w(hidden)
    # The draft vocabulary: a sorted random subset of the target's, stored as offsets (target = draft + d2t).
    chosen = np.sort(rng.choice(vocab, draft_vocab, replace=False))
    tensors["d2t"] = (chosen - np.arange(draft_vocab)).astype(np.int64)
    t2d = np.zeros(vocab, bool)
    t2d[chosen] = True
    tensors["t2d"] = t2d
    if own_embeddings:
        tensors["embed_tokens.weight"] = w(vocab, hidden)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.as_tensor(v) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


def mtp_tensors(tensors: dict[str, np.ndarray], layers: int, rng: np.random.RandomState,
                copies: bool = True) -> dict[str, np.ndarray]:
    """An MTP block `model.layers.{layers}` in DeepSeek-V3's naming: a decoder layer shaped like the last
    one, `enorm`, `hnorm`, `eh_proj [E, 2E]`, `shared_head.norm` and, with `copies` (DeepSeek-V3 ships
    them, GLM-4.6 does not), copies of the model's embeddings and LM head."""
    last = f"model.layers.{layers - 1}."
    block = {f"model.layers.{layers}.{k[len(last):]}": v + rng.randn(*v.shape).astype(v.dtype) * 0.02
             for k, v in tensors.items() if k.startswith(last)}
    hidden = tensors["model.norm.weight"].shape[0]
    extra = {"enorm.weight": (hidden,), "hnorm.weight": (hidden,), "eh_proj.weight": (hidden, 2 * hidden),
             "shared_head.norm.weight": (hidden,)}
    block.update({f"model.layers.{layers}.{k}": rng.randn(*shape).astype(np.float32) * 0.1 for k, shape in extra.items()})
    if copies:
        block[f"model.layers.{layers}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].copy()
        block[f"model.layers.{layers}.shared_head.head.weight"] = tensors["lm_head.weight"].copy()
    return block


def add_mtp_block(source: Path, folder: Path, seed: int = 0, copies: bool = True) -> None:
    """A copy of checkpoint `source` (DeepSeek-V3 or GLM-4.5) with an MTP block `model.layers.{N}` (and the
    tokenizer)."""
    import shutil

    tensors = load_file(str(source / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    tensors.update(mtp_tensors(tensors, config["num_hidden_layers"], np.random.RandomState(seed), copies))
    shutil.copytree(source, folder)
    save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
