"""EAGLE-3 draft heads in the layout their published checkpoints use (EAGLE's and SpecForge's output).

A checkpoint folder holds a Llama `config.json` (`architectures: ["LlamaForCausalLMEagle3"]`, one
hidden layer, plus `draft_vocab_size`, optionally `target_hidden_size`, `norm_before_residual` and
`eagle_aux_hidden_state_layer_ids`) and tensors `fc.weight [E, 3E_t]`, `midlayer.*` (a Llama
decoder layer whose q/k/v take `2E` inputs, with an extra `hidden_norm`), `norm.weight`,
`lm_head.weight [V_d, E]`, `d2t [V_d]` (draft id + d2t = target id), `t2d` (unused here) and
optionally `embed_tokens.weight` (else the target's embeddings are used).

Per position p, fed the target's hidden states at three layers `a_p [3E_t]` (HF's
`hidden_states[i]`, the input of layer i; by default i = 2, N/2, N-3 as vLLM and SpecForge pick):

    g = fc(a_p)                       (deeper drafts: g = the head's own previous output)
    r = hidden_norm(g) if norm_before_residual else g
    x = [input_layernorm(embed(t_{p+1})); hidden_norm(g)]                     [2E]
    r = r + self_attn(x)              (own KV pages)
    o = r + mlp(post_attention_layernorm(r))                                  the next g
    logits = lm_head(norm(o)) placed at target ids d + d2t[d], -inf elsewhere

Glossary: T tokens, E draft hidden, E_t target hidden, V target vocab, V_d draft vocab.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib.cache_spec import PoolSizes
from model_lib.checkpoint import CONFIG_FILE, CheckpointError, iter_tensors
from model_lib.config import ModelConfig
from model_lib.decoder import CausalLM
from model_lib.layers import MLP, Attention, Embed, Linear, PagedBatch, make_norm

ARCHITECTURE = "LlamaForCausalLMEagle3"
IGNORED_TENSORS = ("t2d",)  # target id -> in the draft vocabulary (a mask; drafting never needs it)


def eagle3_config(path: Path, target: ModelConfig, dtype: str) -> tuple[ModelConfig, dict]:
    """The head's `ModelConfig` (a one-layer Llama) and its EAGLE-3 settings, checked against the target."""
    from transformers import LlamaConfig

    from model_lib.families.llama import llama_config

    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"EAGLE-3 draft {path} has no {CONFIG_FILE}")
    raw = json.loads(file.read_text())
    architecture = (raw.get("architectures") or [None])[0]
    if architecture != ARCHITECTURE:
        raise CheckpointError(f"{file} names architecture {architecture!r}; an EAGLE-3 draft is {ARCHITECTURE!r}")
    if raw.get("num_hidden_layers", 1) != 1:
        raise CheckpointError(f"EAGLE-3 drafts with {raw['num_hidden_layers']} layers are not supported (published ones have 1)")
    eagle = raw.get("eagle_config") or {}
    if not eagle.get("use_aux_hidden_state", True):
        raise CheckpointError("eagle_config.use_aux_hidden_state false (EAGLE-1/2 style heads) is not supported")
    hf = LlamaConfig.from_dict({k: v for k, v in raw.items() if k != "architectures"})
    config = llama_config(hf, "LlamaForCausalLM").replace(dtype=dtype)
    if config.vocab_size != target.vocab_size:
        raise CheckpointError(f"EAGLE-3 draft vocab_size ({config.vocab_size}) differs from the target's ({target.vocab_size})")
    target_hidden = raw.get("target_hidden_size") or config.hidden_size
    if target_hidden != target.hidden_size:
        raise CheckpointError(f"EAGLE-3 draft target_hidden_size ({target_hidden}) differs from the target's "
                              f"hidden size ({target.hidden_size})")
    n = target.num_layers
    layers = raw.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids") \
        or [2, n // 2, n - 3]
    if len(layers) != 3 or not all(isinstance(i, int) and 0 <= i < n for i in layers):
        raise CheckpointError(f"EAGLE-3 needs three target layers in [0, {n}); got {layers} "
                              f"(a target of {n} layers has no defaults below 4 layers)")
    draft_vocab = raw.get("draft_vocab_size") or config.vocab_size
    if not 1 <= draft_vocab <= config.vocab_size:
        raise CheckpointError(f"draft_vocab_size ({draft_vocab}) must be in [1, {config.vocab_size}]")
    settings = dict(draft_vocab=int(draft_vocab), target_hidden=int(target_hidden), aux_layers=tuple(layers),
                    norm_before_residual=bool(raw.get("norm_before_residual", False)))
    return config, settings


class Eagle3Layer(nnx.Module):
    """`midlayer`: attention over `[embedding; hidden]` (q/k/v take 2E), then the MLP."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.self_attn = Attention(config, 0, rngs=rngs)
        attn, width = self.self_attn, 2 * config.hidden_size
        common = dict(use_bias=config.qkv_bias, dtype=jnp.dtype(config.dtype), init_std=config.initializer_range,
                      rngs=rngs, head_size=attn.head_dim)
        attn.q_proj = Linear(width, attn.num_heads * attn.head_dim, axes=("embed", "q_heads"), **common)
        attn.k_proj = Linear(width, attn.num_kv_heads * attn.head_dim, axes=("embed", "kv_heads"), **common)
        attn.v_proj = Linear(width, attn.num_kv_heads * attn.head_dim, axes=("embed", "kv_heads"), **common)
        self.mlp = MLP(config, 0, rngs=rngs)
        self.input_layernorm = make_norm(config)
        self.hidden_norm = make_norm(config)
        self.post_attention_layernorm = make_norm(config)


class Eagle3Draft(nnx.Module):
    """An EAGLE-3 head as a hidden-state-fed draft (`serving/spec_decode/hidden_draft.py`)."""

    def __init__(self, config: ModelConfig, settings: dict, target: CausalLM, *, own_embeddings: bool,
                 rngs: nnx.Rngs):
        self.config = config
        self.aux_layers = settings["aux_layers"]
        self.norm_before_residual = settings["norm_before_residual"]
        self.hidden_size = config.hidden_size
        dtype, hidden = jnp.dtype(config.dtype), config.hidden_size
        common = dict(dtype=dtype, init_std=config.initializer_range, rngs=rngs)
        self.embed_tokens = (Embed(config.vocab_size, hidden, axes=("vocab", "embed"), **common) if own_embeddings
                             else target.model.embed_tokens)
        self.fc = Linear(3 * settings["target_hidden"], hidden, axes=(None, "embed"), use_bias=False, **common)
        self.midlayer = Eagle3Layer(config, rngs=rngs)
        self.norm = make_norm(config)
        self.lm_head = Linear(hidden, settings["draft_vocab"], axes=("embed", "vocab"), use_bias=False, **common)
        self.d2t = nnx.Variable(jnp.zeros(settings["draft_vocab"], jnp.int32))

    def capture_layers(self) -> tuple[int, ...]:
        return self.aux_layers

    def make_kv_cache(self, num_pages: int, page_size: int, dtype: jnp.dtype):
        return self.config.layer_cache_spec(0).allocate(PoolSizes(num_pages, page_size, 1), dtype)

    def __call__(self, input_ids: jax.Array, hidden: jax.Array, batch: PagedBatch, kv_cache,
                 from_target: bool) -> tuple[jax.Array, object]:
        """Next tokens `[T]` and hidden states (the target's `[T, 3E_t]`, or the head's own `[T, E]`) -> `o [T, E]`, KV."""
        layer = self.midlayer
        g = self.fc(hidden) if from_target else hidden
        normed = layer.hidden_norm(g)
        residual = normed if self.norm_before_residual else g
        x = jnp.concatenate([layer.input_layernorm(self.embed_tokens(input_ids)), normed], axis=-1)  # [T, 2E]
        attn, kv_cache = layer.self_attn(x, batch, kv_cache)
        residual = residual + attn
        return residual + layer.mlp(layer.post_attention_layernorm(residual)), kv_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`o [S, E]` -> float32 logits `[S, V]`: the draft vocabulary's at their target ids, -inf elsewhere."""
        draft = self.lm_head(self.norm(hidden)).astype(jnp.float32)  # [S, V_d]
        targets = jnp.arange(draft.shape[-1], dtype=jnp.int32) + self.d2t[...]
        full = jnp.full((*draft.shape[:-1], self.config.vocab_size), -jnp.inf, jnp.float32)
        return full.at[..., targets].set(draft)


def load_eagle3(path: str | Path, target: CausalLM) -> Eagle3Draft:
    """An EAGLE-3 checkpoint folder as a draft for `target` (its dtype); missing, unexpected or misshapen
    tensors are named."""
    path = Path(path)
    config, settings = eagle3_config(path, target.config, target.config.dtype)
    tensors = {name: array for _, name, array in iter_tensors(path) if name not in IGNORED_TENSORS}
    own = "embed_tokens.weight" in tensors
    draft = Eagle3Draft(config, settings, target, own_embeddings=own, rngs=nnx.Rngs(0))
    flat = dict(nnx.to_flat_state(nnx.state(draft)))
    expected = {".".join(map(str, p)): v for p, v in flat.items() if own or p[0] != "embed_tokens"}
    values = {}
    for name, array in tensors.items():
        module, _, leaf = name.rpartition(".")
        linear = leaf == "weight" and f"{module}.kernel" in expected
        key = f"{module}.kernel" if linear else name
        if key not in expected:
            raise CheckpointError(f"unexpected tensor {name!r} in EAGLE-3 draft {path}")
        array = np.asarray(array)
        want = tuple(expected[key].shape)
        if (array.T.shape if linear else array.shape) != want:
            raise CheckpointError(f"tensor {name!r} of EAGLE-3 draft {path} has shape {array.shape}, "
                                  f"the config implies {want[::-1] if linear else want}")
        values[key] = jnp.asarray(array.T if linear else array, expected[key].get_value().dtype)
    missing = sorted(set(expected) - set(values))
    if missing:
        raise CheckpointError(f"EAGLE-3 draft {path} is missing tensors: {', '.join(missing)}")
    target_ids = np.asarray(values["d2t"]) + np.arange(settings["draft_vocab"])
    if target_ids.min() < 0 or target_ids.max() >= config.vocab_size:
        raise CheckpointError(f"d2t of EAGLE-3 draft {path} maps draft ids outside the target vocabulary")
    for key, variable in expected.items():
        variable.set_value(values[key])
    nnx.update(draft, nnx.from_flat_state(flat))
    return draft
