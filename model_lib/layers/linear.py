"""Linear projection: base weight (plain or in a quantized format) plus optional LoRA adapter slots.

The base weight is `kernel [in, out]` (HF checkpoints store `weight [out, in]`;
the loader transposes). A quantized base (NF4 under QLoRA, int8, int4, ...) replaces the
kernel by a `QuantizedWeight` in the one `quantized` slot; the layer only calls its
`matmul` and `dequantize`, whatever the format. A LoRA adapter adds `dropout(x) @ A @ B *
scale` with `A [in, r]`, `B [r, out]` (see `model_lib/lora.py`); the same layer
serves the trainer and the server, so every projection of every family gains
adapters and quantization at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.quantization import QuantizedWeight


class LoRAParam(nnx.Param):
    """Adapter weights: the trainable subset under LoRA / QLoRA."""


class Linear(nnx.Module):
    """`y = x @ kernel + bias (+ LoRA)` with `kernel [in, out]`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool,
        dtype: jnp.dtype,
        init_std: float,
        rngs: nnx.Rngs,
        unit_norm_outputs: bool = False,
        head_size: int = 1,
    ):
        self.in_features, self.out_features, self.axes = in_features, out_features, axes
        # Width of one attention head along a `q_heads` / `kv_heads` axis: sharding splits whole heads.
        self.head_size = head_size
        # Scale each output's weight vector (a kernel column, an HF weight row) to unit
        # L2 norm on use, as Baichuan2's NormHead does at every forward.
        self.unit_norm_outputs = unit_norm_outputs
        init = jax.nn.initializers.normal(init_std)
        self.kernel: nnx.Param | None = nnx.Param(
            init(rngs.params(), (in_features, out_features), dtype), logical_axes=axes, head_size=head_size
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=axes[1:], head_size=head_size) if use_bias else None
        )
        # Slots filled later (quantization, adapters): declared data so they may change type.
        self.quantized: QuantizedWeight | None = nnx.data(None)
        self.lora_a: LoRAParam | None = nnx.data(None)
        self.lora_b: LoRAParam | None = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout: nnx.Dropout | None = nnx.data(None)

    def weight(self, dtype: jnp.dtype) -> jax.Array:
        """The base kernel `[in, out]` in `dtype` (dequantized if stored quantized)."""
        if self.quantized is not None:
            kernel = self.quantized.dequantize(dtype)
        else:
            kernel = self.kernel[...].astype(dtype)
        if self.unit_norm_outputs:
            k32 = kernel.astype(jnp.float32)
            norm = jnp.sqrt(jnp.sum(k32 * k32, axis=0, keepdims=True))
            kernel = (k32 / jnp.maximum(norm, 1e-12)).astype(dtype)
        return kernel

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.quantized is not None and not self.unit_norm_outputs:
            y = self.quantized.matmul(x)  # never holds the dequantized kernel past its use
        else:
            y = jnp.dot(x, self.weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.lora_a is not None:
            h = self.lora_dropout(x) if self.lora_dropout is not None else x
            delta = jnp.dot(jnp.dot(h, self.lora_a[...].astype(x.dtype)), self.lora_b[...].astype(x.dtype))
            y = y + delta * jnp.asarray(self.lora_scale, x.dtype)
        return y
