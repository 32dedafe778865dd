"""DeciLM / Nemotron-NAS: Llama-3.1-Nemotron-51B, Llama-3.3-Nemotron-Super-49B, DeciLM-7B.

Reference "own": no transformers class; only the checkpoints' remote code
(`modeling_decilm.py`, `block_config.py`, model_type "nemotron-nas" or "deci")
defines the math. Reproduced from it: a Llama (RMSNorm, rotary with Llama's
scalings, gated MLP, `attention_bias` / `mlp_bias` as in Llama) whose layer i
follows `block_configs[i]`:
- `attention.n_heads_in_group`: GQA group size, kv heads = num_attention_heads // group;
- `attention.no_op`: no attention and no `input_layernorm` (the residual passes through);
- `attention.replace_with_linear`: `input_layernorm`, then one bias-free hidden->hidden
  `self_attn.linear_attn` added to the residual (no rotary, no KV cache);
- `ffn.ffn_mult`: intermediate size `_ffn_mult_to_intermediate_size`, i.e.
  int(2 * ffn_mult * hidden / 3) rounded up to a multiple of 256, with ffn_mult first
  rounded to 6 decimals as `FFNConfig` does;
- `ffn.no_op`: no MLP and no `post_attention_layernorm`; `ffn.replace_with_linear`:
  one bias-free `mlp.linear_mlp`.
`sparsify` only hooks the backward pass upstream and is ignored. DeciLM-7B's
`num_key_value_heads_per_layer` is the same per-layer GQA on a uniform MLP.
Unsupported (ValueError naming the option): sliding-window and sink attention
(`window_length`, `num_sink_tokens`) and any other block option of later variants
(Mamba, MoE, Llama-4 attention, parallel blocks).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import llama_like_fields
from model_lib.registry import Family

# Block options we reproduce; any other one set to something but null/false is refused.
BLOCK_OPTIONS = {
    "attention": ("n_heads_in_group", "no_op", "replace_with_linear", "sparsify"),
    "ffn": ("ffn_mult", "no_op", "replace_with_linear", "sparsify"),
}


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    size = int(2 * round(ffn_mult, 6) * hidden_size / 3)
    return -(-size // 256) * 256


def _kind(sublayer: dict[str, Any], standard: str) -> str:
    return "none" if sublayer.get("no_op") else "linear" if sublayer.get("replace_with_linear") else standard


def _block(layer: int, block: dict[str, Any], heads: int, hidden: int) -> tuple[str, int, str, int]:
    """One `block_configs` entry -> (attention kind, kv heads, MLP kind, intermediate size)."""
    settings = [(key, value) for key, value in block.items() if key not in BLOCK_OPTIONS]
    for key, options in BLOCK_OPTIONS.items():
        settings += [(f"{key}.{name}", value) for name, value in (block.get(key) or {}).items() if name not in options]
    for name, value in settings:
        if value not in (None, False):
            raise ValueError(f"block_configs[{layer}].{name} = {value!r} is not supported")
    attention, ffn = block.get("attention") or {}, block.get("ffn") or {}
    attention_kind, mlp_kind = _kind(attention, "attention"), _kind(ffn, "mlp")
    for kind, part, option in ((attention_kind, "attention", "n_heads_in_group"), (mlp_kind, "ffn", "ffn_mult")):
        if kind in ("attention", "mlp") and (block.get(part) or {}).get(option) is None:
            raise ValueError(f"block_configs[{layer}].{part} needs {option}")
    kv_heads = 0
    if attention_kind == "attention":
        group = attention["n_heads_in_group"]
        if heads % group:
            raise ValueError(f"block_configs[{layer}].attention.n_heads_in_group = {group} does not divide {heads} heads")
        kv_heads = heads // group
    size = ffn_mult_to_intermediate_size(ffn["ffn_mult"], hidden) if mlp_kind == "mlp" else 0
    return attention_kind, kv_heads, mlp_kind, size


def deci_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    fields = llama_like_fields(hf, architecture, "deci", attention_bias=True, mlp_bias=True)
    heads, layers = hf.num_attention_heads, hf.num_hidden_layers
    blocks = getattr(hf, "block_configs", None)
    per_layer_kv = getattr(hf, "num_key_value_heads_per_layer", None)
    if blocks is not None:
        if len(blocks) != layers:
            raise ValueError(f"block_configs has {len(blocks)} entries for {layers} layers")
        attention, kv_heads, mlp, sizes = zip(*(_block(i, b, heads, hf.hidden_size) for i, b in enumerate(blocks)))
    elif per_layer_kv is not None:  # DeciLM-7B / 6B
        if len(per_layer_kv) != layers:
            raise ValueError(f"num_key_value_heads_per_layer has {len(per_layer_kv)} entries for {layers} layers")
        attention, mlp = ("attention",) * layers, ("mlp",) * layers
        kv_heads, sizes = tuple(per_layer_kv), (hf.intermediate_size,) * layers
    else:
        raise ValueError("a DeciLM config needs block_configs or num_key_value_heads_per_layer")
    # Per-layer fields stay empty where every layer agrees, so a uniform stack is a plain Llama config.
    return ModelConfig(
        **{
            **fields,
            "num_kv_heads": max(kv_heads) or heads,
            "intermediate_size": max(sizes),
            "layer_num_kv_heads": () if len(set(kv_heads)) == 1 else tuple(kv_heads),
            "layer_intermediate_sizes": () if len(set(sizes)) == 1 else tuple(sizes),
            "layer_attention": () if set(attention) == {"attention"} else tuple(attention),
            "layer_mlp": () if set(mlp) == {"mlp"} else tuple(mlp),
        }
    )


DECI = Family(
    "deci",
    deci_config,
    quirks="per-layer GQA groups and FFN sizes, no-op and linear-replaced attention/MLP (remote code, own reference)",
    remote_code=True,
)
