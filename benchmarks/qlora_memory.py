"""Peak device memory of QLoRA (NF4 base + float32 adapters) against bf16 LoRA, at load and in a training step.

Writes a random-weight Llama checkpoint with the shapes of Llama-3-8B (hidden 4096, MLP 14336,
32 / 8 heads, vocab 128256) but fewer layers, tensor by tensor in bf16 (nothing downloaded), then
for each setup:
- load: the peak of device bytes held by live arrays while the checkpoint loads (sampled after
  every tensor is placed, and after the in-memory quantization of the old path);
- step: XLA's compiled memory analysis of one jitted LoRA training step (adapters r=16 on all
  linear layers, AdamW, per-layer rematerialisation as in configs/qlora.yaml): arguments +
  outputs - donated aliases + temporaries.

Setups: bf16 LoRA; QLoRA quantized after a bf16 load (the old path); QLoRA quantized while
streaming (`from_pretrained(quantization="nf4")`); the same with the embedding and output head
in NF4 too (`"nf4-embeddings"`).

    PYTHONPATH=. python benchmarks/qlora_memory.py [--layers 4 --seq 512 --batch 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import transformers
from flax import nnx
from safetensors.numpy import save_file

import model_lib
from model_lib.layers.linear import LoRAParam
from model_lib.lora import LoraConfig, apply_lora, param_bytes, quantize_model_nf4
from model_lib.sharding import ShardingPlan, make_mesh
from training.data import Batch
from training.trainer import _cast_floating, token_loss

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> None:
    """A bf16 Llama checkpoint of random weights, one safetensors file per layer (host memory stays small)."""
    config = transformers.LlamaConfig(**LLAMA_8B, num_hidden_layers=layers, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    rng = np.random.default_rng(seed)
    e, m, v = LLAMA_8B["hidden_size"], LLAMA_8B["intermediate_size"], LLAMA_8B["vocab_size"]
    kv = e // LLAMA_8B["num_attention_heads"] * LLAMA_8B["num_key_value_heads"]

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    files: list[tuple[str, dict[str, np.ndarray]]] = [
        ("embed", {"model.embed_tokens.weight": normal(v, e), "lm_head.weight": normal(v, e),
                   "model.norm.weight": np.ones(e, ml_dtypes.bfloat16)})
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (e, e), "self_attn.k_proj": (kv, e), "self_attn.v_proj": (kv, e),
                  "self_attn.o_proj": (e, e), "mlp.gate_proj": (m, e), "mlp.up_proj": (m, e), "mlp.down_proj": (e, m)}
        tensors = {f"{p}{name}.weight": normal(*shape) for name, shape in shapes.items()}
        tensors |= {f"{p}{n}.weight": np.ones(e, ml_dtypes.bfloat16) for n in ("input_layernorm", "post_attention_layernorm")}
        files.append((f"layer{i}", tensors))
    weight_map = {}
    for name, tensors in files:
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"format": "pt"})
        weight_map |= {key: f"{name}.safetensors" for key in tensors}
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def live_device_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


@dataclass(frozen=True)
class RecordingPlan(ShardingPlan):
    """A one-device plan that samples live device bytes after every array the loader places."""

    peak: list = None  # [bytes], mutable inside the frozen plan

    def place(self, array, logical_axes=None, *, sharding=None):
        placed = super().place(array, logical_axes, sharding=sharding)
        self.peak[0] = max(self.peak[0], live_device_bytes())
        return placed


def step_memory(model: nnx.Module, batch: int, seq: int) -> dict[str, int]:
    """XLA's memory analysis of one jitted LoRA training step (the trainer's step, without accumulation)."""
    model.model.remat = True
    graphdef, trainable, rng_state, frozen = nnx.split(model, LoRAParam, nnx.RngState, ...)
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(trainable)
    dtype = jnp.bfloat16

    def train_step(trainable, opt_state, frozen, tokens: Batch):
        def loss_fn(params):
            merged = nnx.merge(graphdef, _cast_floating(params, dtype), rng_state, _cast_floating(frozen, dtype))
            loss, count = token_loss(merged, tokens)
            return loss / jnp.maximum(count, 1)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(trainable, opt_state, frozen, Batch(ids, ids, ids)).compile()
    stats = compiled.memory_analysis()
    sizes = {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
    }
    sizes["peak"] = sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
    return sizes


def measure(folder: Path, setup: str, lora: LoraConfig, batch: int, seq: int) -> dict[str, int]:
    plan = RecordingPlan(make_mesh({}, jax.devices()[:1]), peak=[0])
    quantization = {"qlora-stream": "nf4", "qlora-stream-embeddings": "nf4-embeddings"}.get(setup)
    model = model_lib.from_pretrained(folder, dtype="bfloat16", mesh=plan, quantization=quantization)
    if setup == "qlora-after-load":
        quantize_model_nf4(model)
        gc.collect()
        plan.peak[0] = max(plan.peak[0], live_device_bytes())
    apply_lora(model, lora)
    result = {"load_peak": plan.peak[0], "params": param_bytes(model)}
    result |= {f"step_{k}": v for k, v in step_memory(model, batch, seq).items()}
    del model
    gc.collect()
    return result


SETUPS = {
    "bf16-lora": "bf16 LoRA",
    "qlora-after-load": "QLoRA, NF4 after a bf16 load (old path)",
    "qlora-stream": "QLoRA, NF4 while streaming",
    "qlora-stream-embeddings": "QLoRA, NF4 while streaming, embedding + head in NF4 too",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {list(SETUPS)}")
    args = p.parse_args()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), args.layers)
        for setup in args.setups.split(","):
            results[setup] = measure(Path(tmp), setup, lora, args.batch, args.seq)
            print(setup, results[setup], flush=True)
    gib = 2**30
    base = results.get("bf16-lora")
    print(
        f"\nLlama-3-8B shapes, {args.layers} layers; LoRA r=16 all-linear; batch {args.batch} x {args.seq} tokens; "
        f"jax {jax.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
        f"device {jax.devices()[0].device_kind}"
    )
    print("| setup | load peak GiB | vs bf16 LoRA | step peak GiB | vs bf16 LoRA | step temporaries GiB |")
    print("|---|---|---|---|---|---|")
    for setup, r in results.items():
        load_ratio = f"{r['load_peak'] / base['load_peak']:.3f}" if base else "-"
        step_ratio = f"{r['step_peak'] / base['step_peak']:.3f}" if base else "-"
        print(f"| {SETUPS[setup]} | {r['load_peak'] / gib:.3f} | {load_ratio} | {r['step_peak'] / gib:.3f} | "
              f"{step_ratio} | {r['step_temporaries'] / gib:.3f} |")


if __name__ == "__main__":
    main()
