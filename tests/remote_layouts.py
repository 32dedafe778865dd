"""Checkpoints in layouts that only remote code reads, re-packed from a native transformers model.

`write(layout, model, folder, architecture, **options)` replaces a folder that holds the native
model's `save_pretrained` output with the remote layout: config.json with the
remote config fields and model.safetensors with the remote tensor names and
shapes (fused, renamed, interleaved). The native model then is the reference
holding the same weights unpacked. Names and shapes follow the published remote
modeling files (InternLM, InternLM2, Baichuan/Baichuan2, Qwen, ChatGLM2/3/GLM-4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors.numpy import save_file

Tensors = dict[str, np.ndarray]

LAYER = "model.layers.{i}"


def _tensors(model) -> Tensors:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items() if "rotary_emb" not in k}


def _llama_fields(c) -> dict[str, Any]:
    """Config fields the Llama-derived remote configs share with transformers' Llama."""
    return dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        hidden_act=c.hidden_act,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        tie_word_embeddings=False,
        use_cache=True,
        torch_dtype="float32",
    )


def _rename(tensors: Tensors, table: dict[str, str], layers: int) -> Tensors:
    """Native module prefix -> remote prefix (patterns with {i} expanded per layer); others kept."""
    pairs = []
    for native, remote in table.items():
        pairs += [(native.format(i=i), remote.format(i=i)) for i in range(layers)] if "{i}" in native else [(native, remote)]
    out = {}
    for name, tensor in tensors.items():
        for native, remote in pairs:
            if name.startswith(native + "."):
                name = remote + name[len(native) :]
                break
        out[name] = tensor
    return out


def _fuse(tensors: Tensors, parts: list[str], fused: str, groups: int = 1) -> None:
    """Join `parts` (module names) along the output dimension into `fused`, in `groups` interleaved blocks."""
    for leaf in ("weight", "bias"):
        if f"{parts[0]}.{leaf}" not in tensors:
            continue
        arrays = [tensors.pop(f"{p}.{leaf}") for p in parts]
        blocks = [a.reshape(groups, a.shape[0] // groups, *a.shape[1:]) for a in arrays]
        tensors[f"{fused}.{leaf}"] = np.concatenate(blocks, axis=1).reshape(-1, *arrays[0].shape[1:])


def _fuse_qkv(tensors: Tensors, layers: int, fused: str, groups: int = 1) -> None:
    for i in range(layers):
        attn = f"{LAYER}.self_attn".format(i=i)
        _fuse(tensors, [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], fused.format(i=i), groups)


def internlm(model, rotary: str = "dynamic") -> tuple[dict, Tensors]:
    c = model.config
    assert c.attention_bias and c.num_key_value_heads == c.num_attention_heads
    rope = c.rope_parameters
    config = {
        **_llama_fields(c),
        "model_type": "internlm",
        "max_position_embeddings": c.max_position_embeddings,
        "bias": True,
        "rotary": {"base": rope["rope_theta"], "type": rotary, **({"scaling_factor": rope["factor"]} if rotary == "dynamic" else {})},
    }
    return config, _tensors(model)


def internlm2(model) -> tuple[dict, Tensors]:
    c = model.config
    rope = dict(c.rope_parameters)
    theta, kind = rope.pop("rope_theta"), rope.pop("rope_type")
    config = {
        **_llama_fields(c),
        "model_type": "internlm2",
        "num_key_value_heads": c.num_key_value_heads,
        "max_position_embeddings": c.max_position_embeddings,
        "bias": bool(c.attention_bias),
        "rope_theta": theta,
        "rope_scaling": None if kind == "default" else {"type": kind, **rope},
        "attn_implementation": "eager",
    }
    tensors = _tensors(model)
    _fuse_qkv(tensors, c.num_hidden_layers, LAYER + ".attention.wqkv", groups=c.num_key_value_heads)
    table = {
        "model.embed_tokens": "model.tok_embeddings",
        LAYER + ".self_attn.o_proj": LAYER + ".attention.wo",
        LAYER + ".mlp.gate_proj": LAYER + ".feed_forward.w1",
        LAYER + ".mlp.up_proj": LAYER + ".feed_forward.w3",
        LAYER + ".mlp.down_proj": LAYER + ".feed_forward.w2",
        LAYER + ".input_layernorm": LAYER + ".attention_norm",
        LAYER + ".post_attention_layernorm": LAYER + ".ffn_norm",
        "lm_head": "output",
    }
    return config, _rename(tensors, table, c.num_hidden_layers)


def internlm3(model) -> tuple[dict, Tensors]:
    """transformers' own layout with the upstream bias keys."""
    config = model.config.to_dict()
    config["qkv_bias"], config["bias"] = config.pop("attention_bias"), config.pop("mlp_bias")
    return config, _tensors(model)


def baichuan(model, version: int = 2, alibi: bool = False, seed: int = 0) -> tuple[dict, Tensors]:
    """Baichuan (1) or Baichuan2 (NormHead), 7B (rotary) or 13B (ALiBi: `alibi`).

    Baichuan2's lm_head rows are normalised on use: the native model's rows are
    made unit-norm in place and the checkpoint stores them rescaled at random.
    """
    import torch

    c = model.config
    assert c.num_key_value_heads == c.num_attention_heads and c.rope_parameters["rope_theta"] == 10000.0
    config = {**_llama_fields(c), "model_type": "baichuan"}
    if not alibi:
        config["max_position_embeddings"] = c.max_position_embeddings
    if alibi or version == 2:
        config["model_max_length"] = c.max_position_embeddings
    tensors = _tensors(model)
    if version == 2:
        config["z_loss_weight"] = 0
        with torch.no_grad():
            model.lm_head.weight.div_(model.lm_head.weight.norm(dim=1, keepdim=True))
        scale = np.random.RandomState(seed).uniform(0.5, 2.0, size=(c.vocab_size, 1)).astype(np.float32)
        tensors["lm_head.weight"] = model.lm_head.weight.detach().numpy() * scale
    _fuse_qkv(tensors, c.num_hidden_layers, LAYER + ".self_attn.W_pack")
    return config, tensors


def qwen(model, seq_length: int | None = None, use_dynamic_ntk: bool = True, use_logn_attn: bool = True) -> tuple[dict, Tensors]:
    c = model.config
    assert c.num_key_value_heads == c.num_attention_heads and not c.use_sliding_window
    config = {
        "model_type": "qwen",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": 2 * c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "kv_channels": c.hidden_size // c.num_attention_heads,
        "rotary_pct": 1.0,
        "rotary_emb_base": c.rope_parameters["rope_theta"],
        "layer_norm_epsilon": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "seq_length": seq_length or c.max_position_embeddings,
        "no_bias": True,
        "scale_attn_weights": True,
        "use_dynamic_ntk": use_dynamic_ntk,
        "use_logn_attn": use_logn_attn,
        "use_flash_attn": "auto",
        "emb_dropout_prob": 0.0,
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "fp16": False,
        "fp32": False,
        "initializer_range": c.initializer_range,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    layers = c.num_hidden_layers
    tensors = _tensors(model)
    _fuse_qkv(tensors, layers, "transformer.h.{i}.attn.c_attn")
    table = {
        "model.embed_tokens": "transformer.wte",
        "model.norm": "transformer.ln_f",
        LAYER + ".input_layernorm": "transformer.h.{i}.ln_1",
        LAYER + ".post_attention_layernorm": "transformer.h.{i}.ln_2",
        LAYER + ".self_attn.o_proj": "transformer.h.{i}.attn.c_proj",
        LAYER + ".mlp.up_proj": "transformer.h.{i}.mlp.w1",
        LAYER + ".mlp.gate_proj": "transformer.h.{i}.mlp.w2",
        LAYER + ".mlp.down_proj": "transformer.h.{i}.mlp.c_proj",
    }
    return config, _rename(tensors, table, layers)


def chatglm(model) -> tuple[dict, Tensors]:
    c = model.config
    rope = c.rope_parameters
    head_dim = c.head_dim
    assert rope["rope_type"] == "default" and rope["partial_rotary_factor"] == 0.5 and c.attention_bias
    mqa = c.num_key_value_heads < c.num_attention_heads
    config = {
        "model_type": "chatglm",
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": c.intermediate_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": c.hidden_size,
        "kv_channels": head_dim,
        "layernorm_epsilon": c.rms_norm_eps,
        "multi_query_attention": mqa,
        "multi_query_group_num": c.num_key_value_heads if mqa else 1,
        "num_attention_heads": c.num_attention_heads,
        "num_layers": c.num_hidden_layers,
        "original_rope": True,
        "padded_vocab_size": c.vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": rope["rope_theta"] / 10000.0,
        "seq_length": c.max_position_embeddings,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    layers = c.num_hidden_layers
    tensors = _tensors(model)
    _fuse_qkv(tensors, layers, "transformer.encoder.layers.{i}.self_attention.query_key_value")
    layer = "transformer.encoder.layers.{i}"
    table = {
        "model.embed_tokens": "transformer.embedding.word_embeddings",
        "model.norm": "transformer.encoder.final_layernorm",
        "lm_head": "transformer.output_layer",
        LAYER + ".input_layernorm": layer + ".input_layernorm",
        LAYER + ".post_attention_layernorm": layer + ".post_attention_layernorm",
        LAYER + ".self_attn.o_proj": layer + ".self_attention.dense",
        LAYER + ".mlp.gate_up_proj": layer + ".mlp.dense_h_to_4h",
        LAYER + ".mlp.down_proj": layer + ".mlp.dense_4h_to_h",
    }
    tensors = _rename(tensors, table, layers)
    # The remote code keeps its (unused) rotary frequencies as a persistent buffer.
    rotary = head_dim // 2
    tensors["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (np.arange(0, rotary, 2, dtype=np.float32) / rotary))
    return config, tensors


LAYOUTS: dict[str, Callable[..., tuple[dict, Tensors]]] = {
    "internlm": internlm,
    "internlm2": internlm2,
    "internlm3": internlm3,
    "baichuan": baichuan,
    "qwen": qwen,
    "chatglm": chatglm,
}


def write(layout: str, model, folder: Path, architecture: str, **options: Any) -> dict:
    """Rewrite `folder` (a native `save_pretrained` output of `model`) in the remote layout; return its config."""
    config, tensors = LAYOUTS[layout](model, **options)
    config["architectures"] = [architecture]
    for old in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return config
