"""Multi-head latent attention (MLA): MiniCPM3 and DeepSeek-V2/V3.

Queries: `q_a_proj -> q_a_layernorm -> q_b_proj` (or one `q_proj` when
`q_lora_rank` is None, as in DeepSeek-V2-Lite), per head `[nope | rope]`.
Keys and values: `kv_a_proj_with_mqa` gives `[latent | k_rope]`; the latent goes
through `kv_a_layernorm` and `kv_b_proj` to per-head `[k_nope | v]`, while the one
`k_rope` is rotated and shared by every head. Rotary touches only the rope parts.
Module names are transformers' (DeepseekV2Attention / MiniCPM3Attention), so
checkpoints load by identity and LoRA targets keep their PEFT names.

Dense batches (training, scoring) run the expanded form: the latent goes up to per-head
K `[nope | rope]` and V, padded to `config.head_dim` (max of the qk and v head dims) for
the one `attend()` dispatch; zero padding changes no score and no real output feature.

Paged batches (serving) cache the latent itself: one `LatentCache` pool `[1, P, B, L+R]`
per layer, shared by all heads (`ModelConfig.layer_cache_spec`: `LatentKV`), each token's normed latent `c_kv`
followed by its rotated rope key. They attend in the absorbed form, for prefill chunks and
decode tokens alike: `kv_b_proj` splits per head into W_UK `[L, H, N]` and W_UV `[L, H, V]`;
the query becomes `[q_nope @ W_UK^T | q_rope]` (width L+R), so its scores against the
latent key `[c_kv | k_rope]` equal q_nope.k_nope + q_rope.k_rope of the expanded form;
the attention output over V = c_kv (the first L columns of the same page) goes through
W_UV. This is MQA with one kv head of width L+R whose V is a prefix of K
(`attend(..., value_dim=L)`). Prefix-cached pages hold latents, so chunked prefill and
prefix caching read them like any page.

Long prefill chunks take the expanded form instead when the step says so
(`PagedBatch.expanded_from`, decided on the host: `serving/engine/mla_prefill.py`): the
sequences from that index on attend per head to their context's latents up-projected
block by block through W_UK / W_UV (`pallas_kernels/paged_attention/latent_expanded.py`),
the earlier ones (decode rows) absorbed; every token's latent is written either way.

Glossary: B batch, T tokens, E hidden, H heads, N nope dim, R rope dim, V v dim,
D cache head dim, L kv_lora_rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig, RopeConfig
from model_lib.layers.attention import DenseBatch, LatentCache, PagedBatch, attend
from model_lib.layers.linear import Linear
from model_lib.layers.norms import RMSNorm
from model_lib.layers.rotary import _yarn_mscale, apply_rotary, rotary_cos_sin
from pallas_kernels.paged_attention.latent_expanded import absorbed_rows, expanded_attention

# transformers builds q_a_layernorm and kv_a_layernorm with its RMSNorm default eps,
# not `rms_norm_eps` (MiniCPM3, DeepSeek-V2 and V3 alike).
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(qk_head_dim: int, rope: RopeConfig | None) -> float:
    """`qk_head_dim ** -0.5`, times YaRN's mscale(factor, mscale_all_dim)^2 where the rotary sets it."""
    scale = qk_head_dim**-0.5
    if rope is not None and rope.kind != "default" and rope.mscale_all_dim:
        scale *= _yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


def absorbed_projections(model: nnx.Module) -> set[str]:
    """Paths of the MLA layers' `kv_b_proj`: serving folds its weights (and a trained adapter) into the
    absorbed and expanded attention instead of calling it, so served adapter stacks never reach it."""
    return {".".join(map(str, path)) + ".kv_b_proj" for path, node in nnx.iter_graph(model)
            if isinstance(node, MLAttention)}


def _pad_heads(x: jax.Array, dim: int) -> jax.Array:
    """Zero-pad the last (head) dimension of `x` to `dim`."""
    extra = dim - x.shape[-1]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]) if extra else x


class MLAttention(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.num_heads = heads = config.num_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.cache_dim = config.head_dim
        self.scale = config.attention_scale if config.attention_scale is not None else self.qk_dim**-0.5
        self.softcap = config.attn_logit_softcap
        self.sliding_window = config.layer_window(layer)
        self.rope = config.layer_rope(layer)
        hidden, dtype = config.hidden_size, jnp.dtype(config.dtype)
        common = dict(dtype=dtype, init_std=config.initializer_range, rngs=rngs)

        def latent_norm(dim: int) -> RMSNorm:
            return RMSNorm((dim,), eps=LATENT_NORM_EPS, weight_offset=config.norm_weight_offset, dtype=dtype)

        # Latent dimensions stay whole (None); head dimensions split like the other families'.
        q_out = heads * self.qk_dim
        if self.q_lora_rank is None:
            self.q_proj = Linear(hidden, q_out, axes=("embed", "q_heads"), use_bias=False, head_size=self.qk_dim, **common)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = Linear(hidden, self.q_lora_rank, axes=("embed", None), use_bias=config.qkv_bias, **common)
            self.q_a_layernorm = latent_norm(self.q_lora_rank)
            self.q_b_proj = Linear(
                self.q_lora_rank, q_out, axes=(None, "q_heads"), use_bias=False, head_size=self.qk_dim, **common
            )
        self.kv_a_proj_with_mqa = Linear(
            hidden, self.kv_lora_rank + self.rope_dim, axes=("embed", None), use_bias=config.qkv_bias, **common
        )
        self.kv_a_layernorm = latent_norm(self.kv_lora_rank)
        self.kv_b_proj = Linear(
            self.kv_lora_rank,
            heads * (self.nope_dim + self.v_dim),
            axes=(None, "kv_heads"),
            use_bias=False,
            head_size=self.nope_dim + self.v_dim,
            **common,
        )
        self.o_proj = Linear(
            heads * self.v_dim, hidden, axes=("q_heads", "embed"), use_bias=config.o_bias, head_size=self.v_dim, **common
        )

    def __call__(
        self, x: jax.Array, batch: DenseBatch | PagedBatch, kv_cache: LatentCache | None = None
    ) -> tuple[jax.Array, LatentCache | None]:
        """`x [..., E]` (`[B, T, E]` dense or `[T, E]` paged) -> output and the updated latent pages."""
        lead, heads = x.shape[:-1], self.num_heads
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(*lead, heads, self.qk_dim)  # [B,T,H,N+R]
        q_nope, q_rope = q[..., : self.nope_dim], q[..., self.nope_dim :]

        latent = self.kv_a_proj_with_mqa(x)  # [B,T,L+R]
        c_kv = self.kv_a_layernorm(latent[..., : self.kv_lora_rank])  # [B,T,L]
        k_rope = latent[..., None, self.kv_lora_rank :]  # [B,T,1,R]: one rope key for all heads

        if self.rope is not None:
            cos, sin = rotary_cos_sin(self.rope, batch.positions, batch.seq_lens, q.dtype)
            q_rope = apply_rotary(q_rope, cos, sin, self.rope.interleaved)
            k_rope = apply_rotary(k_rope, cos, sin, self.rope.interleaved)
        if isinstance(batch, PagedBatch):
            return self._absorbed(q_nope, q_rope, c_kv, k_rope, batch, kv_cache)

        kv = self.kv_b_proj(c_kv).reshape(*lead, heads, self.nope_dim + self.v_dim)  # [B,T,H,N+V]
        k_nope, v = kv[..., : self.nope_dim], kv[..., self.nope_dim :]
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*lead, heads, self.rope_dim))], axis=-1)

        q, k, v = (_pad_heads(t, self.cache_dim) for t in (q, k, v))  # [B,T,H,D]
        out, kv_cache = attend(
            q, k, v, batch, kv_cache, scale=self.scale, sliding_window=self.sliding_window, softcap=self.softcap
        )
        out = out[..., : self.v_dim].reshape(*lead, heads * self.v_dim)
        return self.o_proj(out), kv_cache

    def _kv_b_weight(self, dtype: jnp.dtype) -> jax.Array:
        """`kv_b_proj`'s effective kernel `[L, H, N+V]` (dequantized, with a LoRA adapter's delta)."""
        proj = self.kv_b_proj
        kernel = proj.weight(dtype)
        if proj.lora_a is not None:
            delta = jnp.dot(proj.lora_a[...].astype(dtype), proj.lora_b[...].astype(dtype))
            kernel = kernel + delta * jnp.asarray(proj.lora_scale, dtype)
        return kernel.reshape(self.kv_lora_rank, self.num_heads, self.nope_dim + self.v_dim)

    def _absorbed(
        self,
        q_nope: jax.Array,
        q_rope: jax.Array,
        c_kv: jax.Array,
        k_rope: jax.Array,
        batch: PagedBatch,
        kv_cache: LatentCache,
    ) -> tuple[jax.Array, LatentCache]:
        """Paged attention over the latent pages (module docstring): `[T, H*V]` through o_proj."""
        dtype = q_nope.dtype
        weight = self._kv_b_weight(dtype)
        w_uk, w_uv = weight[..., : self.nope_dim], weight[..., self.nope_dim :]  # [L,H,N], [L,H,V]
        q_latent = jnp.einsum("thn,lhn->thl", q_nope, w_uk, preferred_element_type=jnp.float32).astype(dtype)
        query = jnp.concatenate([q_latent, q_rope], axis=-1)  # [T,H,L+R]
        key = jnp.concatenate([c_kv[:, None, :], k_rope], axis=-1)  # [T,1,L+R]
        first = batch.expanded_from
        out, kv_cache = attend(
            query, key, None, batch, kv_cache, scale=self.scale, sliding_window=self.sliding_window,
            softcap=self.softcap, value_dim=self.kv_lora_rank,
            attend_meta=None if first is None else absorbed_rows(batch.meta, first),
        )  # [T,H,L]
        out = jnp.einsum("thl,lhv->thv", out, w_uv, preferred_element_type=jnp.float32).astype(dtype)
        if first is not None:  # each call leaves the other's rows zero
            out = out + expanded_attention(q_nope, q_rope, kv_cache, batch.meta, first, w_uk, w_uv, scale=self.scale,
                                           sliding_window=self.sliding_window, softcap=self.softcap, layer=batch.layer)
        return self.o_proj(out.reshape(out.shape[0], self.num_heads * self.v_dim)), kv_cache
