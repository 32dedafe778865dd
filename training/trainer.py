"""`train(config)`: full fine-tuning, LoRA and QLoRA through one step function.

The model is split into what trains (LoRA adapters, or every parameter), the
dropout RNG state, and what stays frozen (base weights, NF4 storage). One
jitted step scans over the gradient-accumulation micro-batches, sums token
losses and counts, and applies AdamW with clipping and a warmup + decay
schedule. Full fine-tuning keeps float32 master weights and computes in
`torch_dtype`. Checkpoints (orbax) hold the trainable state, optimizer state,
RNG state, step and early-stopping state; the data order is a function of
(seed, epoch), so a resumed run sees exactly the batches it would have seen.
SIGTERM saves a checkpoint before the process exits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

import model_lib
from model_lib.checkpoint import read_config_json, resolve_dtype
from model_lib.encdec import load_seq2seq, seq2seq_architecture
from model_lib.encdec.export import save_seq2seq
from model_lib.layers.linear import LoRAParam
from model_lib.layers.moe import capture_router_logits, collect_router_logits, moe_blocks, router_aux_loss
from model_lib.lora import apply_lora, merge_lora, param_bytes, save_peft_adapter
from model_lib.parallel import kernel_plan
from model_lib.sharding import ShardingPlan, as_plan, shardings_of
from model_lib import distributed
from training.config import TrainConfig
from model_lib.vision.merge import MergedEmbeddings
from training.data import (IGNORE, Batch, DataConfig, epoch_batches, image_slots, load_examples, run_image_extent,
                           split_validation)
from training.images import TrainingImages

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step, this process
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False
    interrupted: bool = False
    param_bytes: int = 0


def _cast_floating(tree: Any, dtype: jnp.dtype) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def token_loss(model: nnx.Module, batch: Batch, router_aux_coef: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross entropy over the batch's targets, and how many there are.

    With `router_aux_coef` (MoE models prepared by `collect_router_logits`), the
    router load-balancing loss is added per target token, so the step's mean loss
    is mean cross entropy + coef * aux, as in transformers.
    """
    if router_aux_coef:
        (ce_sum, count), router_logits = capture_router_logits(token_loss)(model, batch)
        aux = router_aux_loss(model.config, router_logits, batch.segment_ids != 0)
        return ce_sum + router_aux_coef * aux * count, count
    if batch.decoder_input_ids is not None:  # an encoder-decoder: sources in, targets along the decoder inputs
        logits = model(batch.input_ids, batch.segment_ids != 0, batch.decoder_input_ids)
    else:
        logits = model(batch.input_ids, segment_ids=batch.segment_ids, **image_inputs(model, batch))
    mask = batch.targets != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, batch.targets, 0))
    return jnp.sum(ce * mask), jnp.sum(mask)


def check_trainable(config: model_lib.ModelConfig) -> None:
    """The trainer's objective is next-token loss; refuse by name a model it would train wrongly."""
    if config.block_causal_size is not None:
        # Under block-causal attention a token sees the rest of its block, its own next-token labels included.
        raise NotImplementedError(
            f"{config.architecture}: fine-tuning a block diffusion model needs its masked-diffusion objective "
            "(noised and clean copies of each block), which the trainer does not implement"
        )


def seq2seq_model(config: TrainConfig, dtype: str, plan: ShardingPlan | None) -> nnx.Module:
    """An encoder-decoder to fine-tune, refusing what its training does not cover yet (by name)."""
    refused = [name for name, used in (("qlora", config.peft_method == "qlora"), ("a mesh", plan is not None),
                                       ("packing", config.packing)) if used]
    if refused:
        raise ValueError(f"encoder-decoder fine-tuning does not support {', '.join(refused)} yet")
    return load_seq2seq(config.model_name_or_path, dtype=dtype)


def image_inputs(model: nnx.Module, batch: Batch) -> dict[str, Any]:
    """The forward's `merged` image features for a batch with images (Mllama: its cross-attention inputs;
    nothing for text batches)."""
    if batch.pixel_values is None:
        return {}
    if batch.cross_attention_mask is not None:  # Mllama: its forward reads the tiles by cross attention
        return {"pixel_values": batch.pixel_values, "aspect_ratio_ids": batch.aspect_ratio_ids,
                "aspect_ratio_mask": batch.aspect_ratio_mask, "cross_attention_mask": batch.cross_attention_mask,
                "num_images": jnp.sum(batch.aspect_ratio_ids > 0, axis=-1)}
    if batch.vision_layout is not None:
        return grid_image_inputs(model, batch)
    pixels = batch.pixel_values  # [rows, slots, *pixel_shape]
    mm, modules = model.config.multimodal, model.vision_modules()
    # The model's own per-image encoder (as serving's), over every slot at once: [rows * slots, F, E].
    images = pixels.reshape(-1, *pixels.shape[2:])
    if batch.image_sizes is not None:  # images of their own size (Pixtral): each encoded within its padding
        sizes = batch.image_sizes.reshape(-1, 2)
        features = jax.vmap(lambda image, size: model.encode_padded(mm, modules, image, size))(images, sizes)
    else:
        features = jax.vmap(lambda image: model.encode(mm, modules, image))(images)
    if batch.image_sources is not None:  # any-res: each slot's tiles arranged by its host layout: [rows * slots, F, E]
        sources, weights = (x.reshape(-1, *x.shape[2:]) for x in (batch.image_sources, batch.image_weights))
        features = jax.vmap(lambda f, s, w: model.arrange_by_layout(mm, modules, f, s, w))(features, sources, weights)
    return {"merged": MergedEmbeddings(features.reshape(-1, features.shape[-1]), batch.image_index)}


def grid_image_inputs(model: nnx.Module, batch: Batch) -> dict[str, Any]:
    """Qwen-VL's `merged` features (each slot's padded patch rows through the tower by its padded layout, DeepStack
    sets split off) and the rows' M-RoPE positions."""
    slots = lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])  # noqa: E731 (sizes: tables may be empty)
    pixels, layouts = slots(batch.pixel_values), jax.tree.map(slots, batch.vision_layout)  # [rows * slots, N, ...]
    features = jax.vmap(model.visual.features)(pixels, layouts)  # [rows * slots, U, (1 + K) E]
    merged = MergedEmbeddings.from_sets(features.reshape(-1, features.shape[-1]), batch.image_index,
                                        model.config.hidden_size)
    return {"merged": merged, "rope_positions": jnp.moveaxis(batch.rope_positions, 1, 0)}


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    warmup = config.warmup_steps or int(math.ceil(config.warmup_ratio * total_steps))
    lr = config.learning_rate
    decay_steps = max(total_steps - warmup, 1)
    if config.lr_scheduler_type == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps)
    elif config.lr_scheduler_type == "linear":
        decay = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        decay = optax.constant_schedule(lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    # Like HF: no weight decay on biases and norm weights (1-D parameters).
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(
            make_schedule(config, total_steps),
            b1=config.adam_beta1,
            b2=config.adam_beta2,
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        ),
    )


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # Before any JAX computation: join the other processes, then build the mesh over all their devices.
        self.multi_process = distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
        if self.multi_process and config.mesh is None:
            raise ValueError("a multi-process run needs a mesh preset (e.g. --mesh fsdp_tp) over all processes' devices")
        self.plan: ShardingPlan | None = as_plan(config.mesh)
        self.compute_dtype = jnp.dtype(config.torch_dtype)
        self._load_model()
        self._load_data()
        self._build_steps()

    # -- setup ----------------------------------------------------------------
    def _load_model(self) -> None:
        c = self.config
        from serving.llm import load_tokenizer  # shared tokenizer loading (training may use serving's helpers)

        self.tokenizer = load_tokenizer(c.model_name_or_path)
        # Full fine-tuning trains float32 master weights; adapters train over a base kept in the compute dtype.
        base_dtype = "float32" if c.peft_method == "none" else c.torch_dtype
        # QLoRA quantizes the base while it streams from the checkpoint: no full-precision copy on the device.
        quantization = None
        if c.peft_method == "qlora":
            quantization = "nf4-embeddings" if c.quantize_embeddings else "nf4"
        self.seq2seq = seq2seq_architecture(c.model_name_or_path) is not None
        if self.seq2seq:
            model = seq2seq_model(c, base_dtype, self.plan)
        else:
            check_trainable(model_lib.load_config(c.model_name_or_path)[0])
            model = model_lib.from_pretrained(c.model_name_or_path, dtype=base_dtype, mesh=self.plan,
                                              quantization=quantization)
        self.lora_config = c.lora_config()
        if self.lora_config is not None:
            apply_lora(model, self.lora_config, seed=c.seed)
        model.model.remat = c.gradient_checkpointing
        self.router_aux_coef = 0.0
        if c.output_router_logits and moe_blocks(model):
            coef = c.router_aux_loss_coef
            self.router_aux_coef = float(model.config.router_aux_loss_coef if coef is None else coef)
            collect_router_logits(model)
        self.param_bytes = param_bytes(model)
        self.model = model
        trainable = LoRAParam if c.peft_method != "none" else nnx.Param
        model.train()
        self.graphdef, self.trainable, self.rng_state, self.frozen = nnx.split(model, trainable, nnx.RngState, ...)
        model.eval()
        self.eval_graphdef = nnx.split(model, trainable, nnx.RngState, ...)[0]
        if self.plan is not None:
            # Global arrays on the mesh (every process holds the same values): adapters and RNG replicated.
            if c.peft_method != "none":
                self.trainable = self._global(self.trainable)
            self.rng_state = self._global(self.rng_state)

    def _load_data(self) -> None:
        c = self.config
        data = DataConfig(
            dataset_text_field=c.dataset_text_field, response_template=c.response_template,
            data_formatter_template=c.data_formatter_template, max_seq_length=c.max_seq_length, packing=c.packing,
            decoder_start_token_id=self.model.config.decoder_start_token_id if self.seq2seq else None,
        )
        images = None
        if self.model.config.multimodal is not None:
            images = TrainingImages(c.model_name_or_path, self.model.config, Path(c.training_data_path).parent)
        examples = load_examples(c.training_data_path, self.tokenizer, data, images)
        if c.validation_data_path:
            self.eval_examples = load_examples(c.validation_data_path, self.tokenizer, data, images)
        elif c.validation_split > 0:
            examples, self.eval_examples = split_validation(examples, c.validation_split, c.seed)
        else:
            self.eval_examples = []
        self.examples = examples
        self.images_per_row = image_slots([*examples, *self.eval_examples], c.packing)
        self.image_extent = run_image_extent([*examples, *self.eval_examples])  # one image shape for every batch
        self.rows = c.per_device_train_batch_size * self._data_parallel()
        self.batches_per_epoch = len(epoch_batches(examples, **self._batch_args(0)))
        steps_per_epoch = max(1, self.batches_per_epoch // c.gradient_accumulation_steps)
        self.total_steps = c.max_steps if c.max_steps > 0 else int(math.ceil(steps_per_epoch * c.num_train_epochs))
        self._epoch_cache: dict[int, list[Batch]] = {}

    def _data_parallel(self) -> int:
        if self.plan is None:
            return 1
        return int(np.prod([self.plan.mesh.shape[a] for a in ("data", "fsdp") if a in self.plan.mesh.shape]))

    def _replicated(self) -> NamedSharding:
        return self.plan.replicated()

    def _global(self, tree: Any, sharding: NamedSharding | None = None) -> Any:
        """Host-identical values as global arrays (each process fills only its own devices)."""
        sharding = sharding or self._replicated()

        mesh_devices = set(self.plan.mesh.devices.flat)

        def put(x: Any) -> Any:
            if isinstance(x, jax.Array) and x.sharding.device_set == mesh_devices:
                return x  # already a global array on the mesh
            host = np.asarray(jax.device_get(x)) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else None
            if host is None:  # typed PRNG keys: place their raw key data
                return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
            return self.plan.place(host, sharding=sharding)

        return jax.tree.map(put, tree)

    def _batch_args(self, epoch: int) -> dict[str, Any]:
        c = self.config
        return dict(rows_per_batch=self.rows, max_seq_length=c.max_seq_length, packing=c.packing, seed=c.seed, epoch=epoch,
                    images_per_row=self.images_per_row, image_extent=self.image_extent)

    def micro_batch(self, index: int) -> Batch:
        """The `index`-th micro-batch of the run: a pure function of (seed, index)."""
        epoch, within = divmod(index, self.batches_per_epoch)
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: epoch_batches(self.examples, **self._batch_args(epoch))}
        return self._epoch_cache[epoch][within]

    def _device_batch(self, batches: list[Batch]) -> Batch:
        stacked = jax.tree.map(lambda *parts: np.stack(parts), *batches)
        if self.plan is None:
            return jax.tree.map(jnp.asarray, stacked)
        return self._global(stacked, self._batch_sharding())

    def _batch_sharding(self) -> NamedSharding:
        """Stacked micro-batches `[accumulation, rows, seq]`: rows split over data x fsdp."""
        return self.plan.rows_sharding(leading=1)

    def _build_steps(self) -> None:
        self.optimizer = make_optimizer(self.config, self.total_steps)
        if self.plan is None:
            self.opt_state = self.optimizer.init(self.trainable)
        else:  # moments placed like the parameters they follow; step counts replicated on the mesh
            self.opt_state = self._global(self.optimizer.init(self.trainable))
        graphdef, eval_graphdef, optimizer, dtype = self.graphdef, self.eval_graphdef, self.optimizer, self.compute_dtype
        router_aux_coef = self.router_aux_coef

        seed, plan = self.config.seed, self.plan
        # The residual stream's rows split like the batch (data x fsdp) at every block boundary.
        activations = None if self.plan is None else self.plan.rows_sharding()

        def train_step(trainable, opt_state, rng_state, frozen, batches: Batch, step: jax.Array):
            accumulation = batches.input_ids.shape[0]

            def micro(carry, inputs):
                grads, loss_sum, count = carry
                batch, index = inputs

                def loss_fn(params):
                    # Fresh RNG variables in this trace: dropout advances their counters.
                    rng = jax.tree.map(lambda x: x, rng_state)
                    model = nnx.merge(graphdef, _cast_floating(params, dtype), rng, _cast_floating(frozen, dtype))
                    # Dropout masks are a pure function of (seed, micro-batch index): resumable without RNG state.
                    nnx.reseed(model, dropout=jax.random.fold_in(jax.random.key(seed), index))
                    model.model.activation_sharding = activations
                    with kernel_plan(plan):  # MoE experts run per expert / width shard
                        return token_loss(model, batch, router_aux_coef)

                (loss, n), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
                return (jax.tree.map(jnp.add, grads, g), loss_sum + loss, count + n), None

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
            indices = step * accumulation + jnp.arange(accumulation)
            (grads, loss_sum, count), _ = jax.lax.scan(micro, init, (batches, indices))
            denominator = jnp.maximum(count, 1).astype(jnp.float32)
            grads = jax.tree.map(lambda g: g / denominator, grads)
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            return trainable, opt_state, rng_state, loss_sum / denominator, optax.tree.norm(grads)

        def eval_step(trainable, rng_state, frozen, batch: Batch):
            model = nnx.merge(eval_graphdef, _cast_floating(trainable, dtype), rng_state, _cast_floating(frozen, dtype))
            return token_loss(model, batch)

        if self.plan is None:
            self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
        else:
            # Explicit shardings: state stays where it was placed, the batch splits over data x fsdp,
            # scalars are replicated; XLA never picks another layout for the parameters.
            self.frozen = self._global(self.frozen)
            state = tuple(shardings_of(t) for t in (self.trainable, self.opt_state, self.rng_state))
            frozen = shardings_of(self.frozen)
            replicated = self._replicated()
            self.train_step = jax.jit(
                train_step,
                in_shardings=(*state, frozen, self._batch_sharding(), replicated),
                out_shardings=(*state, replicated, replicated),
                donate_argnums=(0, 1),
            )
        self.eval_step = jax.jit(eval_step)

    # -- checkpoints ----------------------------------------------------------
    def _manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.config.save_total_limit, create=True)
        return ocp.CheckpointManager((self.output_dir / "checkpoints").absolute(), options=options)

    def _state(self, step: int, best: float, bad_evals: int) -> dict[str, Any]:
        return {
            "trainable": self.trainable,
            "opt_state": self.opt_state,
            "rng": self.rng_state,
            "progress": {"step": np.asarray(step, np.int64), "best_eval": np.asarray(best, np.float64), "bad_evals": np.asarray(bad_evals, np.int64)},
        }

    def save(self, manager: ocp.CheckpointManager, step: int, best: float, bad_evals: int) -> None:
        manager.save(step, args=ocp.args.StandardSave(self._state(step, best, bad_evals)), force=True)
        manager.wait_until_finished()
        logger.info("saved checkpoint at step %d", step)

    def restore(self, manager: ocp.CheckpointManager) -> tuple[int, float, int]:
        step = manager.latest_step()
        if step is None:
            return 0, math.inf, 0
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._state(0, 0.0, 0))
        state = manager.restore(step, args=ocp.args.StandardRestore(target))
        self.trainable, self.opt_state, self.rng_state = state["trainable"], state["opt_state"], state["rng"]
        progress = state["progress"]
        logger.info("resumed from checkpoint at step %d", step)
        return int(progress["step"]), float(progress["best_eval"]), int(progress["bad_evals"])

    # -- evaluation -----------------------------------------------------------
    def evaluate(self) -> float:
        c = self.config
        rows = c.per_device_eval_batch_size * self._data_parallel()
        total, count = 0.0, 0
        batches = epoch_batches(self.eval_examples, rows_per_batch=rows, max_seq_length=c.max_seq_length,
                                packing=c.packing, seed=c.seed, epoch=0, images_per_row=self.images_per_row,
                                image_extent=self.image_extent)
        for batch in batches:
            device_batch = jax.tree.map(lambda x: x[0], self._device_batch([batch]))
            loss, n = self.eval_step(self.trainable, self.rng_state, self.frozen, device_batch)
            total, count = total + float(loss), count + int(n)
        return total / max(count, 1)

    # -- the loop -------------------------------------------------------------
    def train(self) -> TrainResult:
        c = self.config
        manager = self._manager()
        start_step, best, bad_evals = self.restore(manager)
        result = TrainResult(self.output_dir, start_step, param_bytes=self.param_bytes)
        stop = {"signal": False}
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
        leader = distributed.is_leader()  # one process writes the shared metrics
        metrics_file = (self.output_dir / "metrics.jsonl").open("a") if leader else open(os.devnull, "w")
        writer = _tensorboard(self.output_dir) if leader else None
        progress = _progress(c.progress_bar, self.total_steps, start_step)
        step = start_step
        try:
            while step < self.total_steps:
                started = time.perf_counter()
                first = step * c.gradient_accumulation_steps
                batches = [self.micro_batch(first + a) for a in range(c.gradient_accumulation_steps)]
                tokens = sum(int((b.segment_ids > 0).sum()) for b in batches)
                self.trainable, self.opt_state, self.rng_state, loss, grad_norm = self.train_step(
                    self.trainable, self.opt_state, self.rng_state, self.frozen, self._device_batch(batches), step
                )
                step += 1
                loss = float(loss)
                result.losses.append(loss)
                record = {"step": step, "loss": loss, "grad_norm": float(grad_norm),
                          "tokens_per_second": tokens / (time.perf_counter() - started)}
                if c.eval_steps and step % c.eval_steps == 0 and self.eval_examples:
                    eval_loss = self.evaluate()
                    record["eval_loss"] = eval_loss
                    result.eval_losses.append((step, eval_loss))
                    if eval_loss < best:
                        best, bad_evals = eval_loss, 0
                    else:
                        bad_evals += 1
                if step % max(c.logging_steps, 1) == 0 or step == self.total_steps:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if writer is not None:
                        for key, value in record.items():
                            if key != "step":
                                writer.add_scalar(f"train/{key}", value, step)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
                if c.early_stopping_patience and bad_evals >= c.early_stopping_patience:
                    result.stopped_early = True
                    self.save(manager, step, best, bad_evals)
                    break
                if stop["signal"]:
                    result.interrupted = True
                    self.save(manager, step, best, bad_evals)
                    break
                if c.save_steps and step % c.save_steps == 0:
                    self.save(manager, step, best, bad_evals)
            else:
                if step > start_step or manager.latest_step() != step:
                    self.save(manager, step, best, bad_evals)
        finally:
            signal.signal(signal.SIGTERM, previous)
            progress.close()
            metrics_file.close()
            if writer is not None:
                writer.close()
        result.steps = step
        if not result.interrupted:
            if self.eval_examples and not result.eval_losses:
                result.eval_losses.append((step, self.evaluate()))
            self.export()
        return result

    # -- export ---------------------------------------------------------------
    def trained_model(self) -> nnx.Module:
        """The model with the current trainable state (eval mode)."""
        return nnx.merge(self.eval_graphdef, self.trainable, self.rng_state, self.frozen)

    def export(self) -> None:
        c = self.config
        trainable = self.trainable
        if self.multi_process:  # every process takes part in the gather; the leader writes
            trainable = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), trainable)
            if not distributed.is_leader():
                return
        model = nnx.merge(self.eval_graphdef, trainable, self.rng_state, self.frozen)
        if self.lora_config is None:
            exported = nnx.merge(self.eval_graphdef, _cast_floating(trainable, jnp.dtype(self._base_dtype())),
                                 self.rng_state, self.frozen)
            self._save(exported, self.output_dir)
            self._copy_tokenizer(self.output_dir)
            return
        save_peft_adapter(model, self.lora_config, self.output_dir, str(c.model_name_or_path))
        self._copy_tokenizer(self.output_dir)
        if c.merge_lora:
            if self.seq2seq:
                base = load_seq2seq(c.model_name_or_path, dtype=c.torch_dtype)
            else:
                base = model_lib.from_pretrained(c.model_name_or_path, dtype=c.torch_dtype)
            from model_lib.lora import load_peft_adapter

            load_peft_adapter(base, self.output_dir)
            merge_lora(base)
            self._save(base, self.output_dir / "merged")
            self._copy_tokenizer(self.output_dir / "merged")

    def _save(self, model: nnx.Module, target: Path) -> None:
        if self.seq2seq:
            save_seq2seq(model, self.config.model_name_or_path, target)
        else:
            model_lib.save_pretrained(model, target)

    def _base_dtype(self) -> str:
        if self.seq2seq:
            return resolve_dtype(None, read_config_json(Path(self.config.model_name_or_path)))
        return model_lib.load_config(self.config.model_name_or_path)[0].dtype

    def _copy_tokenizer(self, target: Path) -> None:
        source = Path(self.config.model_name_or_path)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)


def _tensorboard(output_dir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        logger.warning("tensorboardX is not installed; metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(output_dir / "runs"))


class _NoProgress:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step")


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a fine-tuning run; exports the adapter or the model into `output_dir`."""
    return Trainer(config).train()
