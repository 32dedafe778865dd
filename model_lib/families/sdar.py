"""SDAR (JetAstra): a Qwen3 network trained for block diffusion decoding.

Reference "own": transformers has no SDAR class; the checkpoints' remote code
(`modeling_sdar.py`, `configuration_sdar.py`, model_type "sdar") and the SDAR
repository's `generate.py` (`block_diffusion_generate`) define the math. The network
is Qwen3's: per-head q/k RMSNorm before rotary, GQA, gated SiLU MLP, RMSNorm,
`attention_bias` on q/k/v/o, optional tied embeddings; rotary is the default one at
`rope_theta` or transformers' scaling named by `rope_scaling`. What sets it apart is
the attention: block-causal over blocks of `block_size` positions (a token sees every
earlier block and every token of its own block), and decoding fills a block of
`mask_token_id` tokens over several denoising passes (`serving/block_diffusion.py`).
The remote attention ignores `use_sliding_window` / `sliding_window`, and so do we.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import llama_like_fields
from model_lib.registry import Family

SDAR_HEAD_DIM = 128  # SDARConfig's default when config.json names none


def sdar_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    block_size, mask_id = getattr(hf, "block_size", None), getattr(hf, "mask_token_id", None)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"an SDAR config needs a positive integer block_size, got {block_size!r}")
    if mask_id is None or not 0 <= mask_id < hf.vocab_size:
        raise ValueError(f"an SDAR config needs a mask_token_id inside the vocabulary, got {mask_id!r}")
    if getattr(hf, "head_dim", None) is None:
        hf.head_dim = SDAR_HEAD_DIM
    fields = llama_like_fields(hf, architecture, "sdar", attention_bias=True)
    return ModelConfig(**{**fields, "qk_norm": "head", "block_causal_size": block_size, "mask_token_id": mask_id,
                          "bidirectional_spans": True})


SDAR = Family(
    "sdar",
    sdar_config,
    quirks="Qwen3 with block-causal attention, block diffusion decoding (remote code, own reference)",
    remote_code=True,
)
