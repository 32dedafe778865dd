"""The model runner: one jitted step over the ragged batch, KV cache donated.

Host-side, a step's sequences become flat arrays padded to bucket shapes, so
the number of compilations stays bounded: tokens pad to a power of two (at
most `max_num_batched_tokens`), the sequence axis is tied to the token bucket
(min(token bucket, max_num_seqs)), and the page-table width pads to a power of
two. Each new shape is logged once; `step_shapes` lists every one the sizes
allow, which `warm_up` compiles at start.

On the CPU backend (`tight_buckets`) the sequence axis pads to its own power of
two (at most the tied size) and page tables from one page instead of eight: there
every padded row and key is computed. A prefill of 16 prompts in a 1024-token
bucket would otherwise run the LM head and the sampler over 256 rows and cut its
attention into tiles of 1024 / 256 = 4 queries (each gathering its sequence's
pages) instead of 64, and 64-token prompts would attend over 128 keys instead of
64. The CPU compiles shapes on demand, so the extra shapes cost nothing at start;
accelerators warm every shape up and keep the coarser buckets. Each compiled shape holds memory
mappings, of which a process has a fixed number: before a new shape compiles, `executables.py` drops JAX's
compiled programs if the process is near its limit (at the limit LLVM aborts the process).

A token the previous step sampled and the host has not read yet is fed on the
device: its input position names the sequence's slot (`feed`), and the step
takes the token from `fed_tokens` (the sampler's `last_tokens`).

The parameters are passed as a flat list of leaves (flattened once), so a
call does not walk the model's parameter tree.

With served LoRA adapters (`serving/lora/`) the step also takes the adapter stacks and each
token's adapter slot (`StepInputs.lora_slots`); the stacks are arguments of fixed shape, so
loading an adapter replaces their contents without a new compilation.

With `scan_layers` (the default on accelerators) the step runs the model's serving view
(`model_lib.layer_scan.scanned_view`): runs of identical layers go through one
`lax.scan` whose carry holds their stacked KV pools, so a step compiles in about the
same time at any depth and updates the donated pools in place. The CPU backend keeps
the layers unrolled by default: there the scanned step measured up to 1.4x slower (the
loop body copies each layer's weights out of the stack before its matmuls; XLA:CPU
does not fuse a dynamic slice into a dot), and CPU servers compile on demand anyway
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib import CausalLM
from model_lib.layer_scan import scanned_view, segment_layers
from model_lib.layers import PagedBatch
from model_lib.parallel import kernel_plan
from model_lib.sharding import ShardingPlan
from model_lib.vision.qwen_vl import QwenVLConfig
from pallas_kernels.paged_attention import PagedMetadata
from serving.engine.env import env_flag
from serving.engine.executables import make_room_for
from serving.engine.input_batch import InputBatch, StepInputs
from serving.engine.mla_prefill import expanded_from
from serving.engine.scheduler import ScheduledSequence
from serving.engine.step_shardings import place_serving_step
from serving.lora.manager import LoRAManager, adapters_in_step

logger = logging.getLogger(__name__)


# Smallest buckets: fewer shapes to compile at almost no cost on an accelerator (a decode step of up
# to 8 sequences reads the weights once either way; a page table of 8 pages is a few hundred bytes).
# The CPU computes every padded row: there tokens start at 1 (SmolLM2-135M batch-1 decode, 2 cores:
# 14.7 tok/s with a floor of 8, 25.7 with 1; benchmarks/RESULTS.md).
MIN_TOKEN_BUCKET = 8
MIN_CPU_TOKEN_BUCKET = 1
MIN_PAGE_BUCKET = 8
MIN_TOKEN_BUCKET_ENV = "JAXLLM_MIN_TOKEN_BUCKET"
TIGHT_BUCKETS_ENV = "JAXLLM_TIGHT_BUCKETS"  # "1"/"0": tight_buckets' default either way (unset: the backend's)
LARGEST_MIN_TOKEN_BUCKET = 1 << 16


def env_min_token_bucket() -> int | None:
    """`$JAXLLM_MIN_TOKEN_BUCKET` as an int, None when unset or empty."""
    value = os.environ.get(MIN_TOKEN_BUCKET_ENV, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{MIN_TOKEN_BUCKET_ENV}={value!r}: expected an integer") from None


def check_min_token_bucket(value: int | None) -> int:
    """The smallest token bucket: `value`, or the backend's default when None (1 on the CPU, 8 elsewhere)."""
    if value is None:
        return MIN_CPU_TOKEN_BUCKET if jax.default_backend() == "cpu" else MIN_TOKEN_BUCKET
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LARGEST_MIN_TOKEN_BUCKET:
        raise ValueError(f"min_token_bucket must be an integer in [1, {LARGEST_MIN_TOKEN_BUCKET}], got {value!r}")
    return value


def bucket(n: int, smallest: int, largest: int) -> int:
    """Smallest power of two >= n (and >= smallest), capped at `largest`."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest) if n <= largest else n


def buckets(smallest: int, largest: int) -> list[int]:
    """Every value `bucket(n, smallest, largest)` takes for 1 <= n <= largest."""
    sizes = [smallest]
    while sizes[-1] < largest:
        sizes.append(min(sizes[-1] * 2, largest))
    return sizes


def _step(graphdef, treedef, plan, params, kv_caches, input_ids, feed, fed_tokens, batch, logits_indices, merged=None,
          lora=None, *, lora_paths=(), capture=()):
    """`merged`: image features in place of placeholder embeddings; `lora`: with served adapters, (their stacks,
    the per-token slot index `[T_pad]`); `capture`: hidden states every token returns third (speculation)."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    if plan is not None:  # every device runs every token: the residual stream stays replicated
        model.model.activation_sharding = plan.replicated()
    input_ids = jnp.where(feed >= 0, jnp.take(fed_tokens, feed, mode="clip"), input_ids)
    with kernel_plan(plan), adapters_in_step(model, lora_paths, lora):  # kernels run per head / expert shard
        extra = {} if merged is None else {"merged": merged}  # text-only models keep their forward's signature
        if capture:
            extra["capture"] = capture
        return model.forward(input_ids, batch, kv_caches, logits_indices, **extra)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        *,
        num_pages: int,
        page_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        plan: ShardingPlan | None = None,
        scan_layers: bool | None = None,
        kv_cache_dtype: jnp.dtype | None = None,
        lora: LoRAManager | None = None,
        expanded_prefill_tokens: int = 0,
        min_token_bucket: int | None = None,
        tight_buckets: bool | None = None,
    ):
        """`kv_cache_dtype`: the pages' dtype (default the model's; int8 / float8 pages are quantized);
        `lora`: served adapters, whose stacks every step takes (the layers stay unrolled then);
        `expanded_prefill_tokens`: MLA chunks of at least this many new tokens attend expanded (0: never;
        `mla_prefill.py`); `min_token_bucket`: the smallest padded token count (None: the backend's default);
        `tight_buckets`: pad the sequence axis to its own power of two instead of tying it to the token bucket,
        and page tables from one page (None: `$JAXLLM_TIGHT_BUCKETS`, else on the CPU backend only; see the module
        docstring)."""
        config = model.config
        self.config = config
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.min_token_bucket = check_min_token_bucket(min_token_bucket)
        if tight_buckets is None:
            tight_buckets = env_flag(TIGHT_BUCKETS_ENV)
        self.tight_buckets = jax.default_backend() == "cpu" if tight_buckets is None else tight_buckets
        self.min_page_bucket = 1 if self.tight_buckets else MIN_PAGE_BUCKET
        self.scan_layers = jax.default_backend() != "cpu" if scan_layers is None else scan_layers
        if lora is not None:
            if scan_layers:
                raise ValueError("scan_layers does not serve LoRA adapters yet; leave it unset or False")
            self.scan_layers = False  # the adapter stacks are handed to the unrolled layers by path
        self.lora = lora
        self.expanded_prefill_tokens = expanded_prefill_tokens
        if self.scan_layers:
            model = scanned_view(model)
        # The entry of `kv_caches` that holds each decoder layer left unscanned (an encoder fills some: Mllama's).
        segments = segment_layers(model) if isinstance(model, CausalLM) else []
        self.layer_entry = {start: i for i, (start, period, repeats) in enumerate(segments) if period == repeats == 1}
        self.graphdef, self.state = nnx.split(model)
        self.params, treedef = jax.tree.flatten(self.state)
        sharding_fn = plan.sharding if plan is not None else None
        self.kv_caches = model.make_kv_caches(num_pages, page_size, jnp.dtype(kv_cache_dtype or config.dtype),
                                              sharding_fn, num_slots=max_num_seqs + 1)
        self.kv_cache_bytes = sum(a.nbytes for a in jax.tree.leaves(self.kv_caches))
        self.params, self._shardings = place_serving_step(plan, self.params, self.kv_caches,
                                                           num_host_inputs=6 if lora is None else 7)
        self._treedef, self._plan = treedef, plan
        self.capture: tuple[int, ...] = ()
        self.hidden: jax.Array | None = None  # with `capture`: the last step's hidden states [T_pad, C]
        self.capture_hidden(())
        self.fed_tokens = jnp.zeros(max_num_seqs, jnp.int32)  # the engine sets it to the sampler's last_tokens
        self.compiled_shapes: set[tuple] = set()  # (tokens, seqs, pages) [+ "images"]
        mrope = config.multimodal if isinstance(config.multimodal, QwenVLConfig) else None
        self.inputs = InputBatch(max_num_seqs, self.max_pages_per_seq, with_lora=lora is not None, mrope=mrope,
                                 spans=config.bidirectional_spans)

    def capture_hidden(self, layers: tuple[int, ...]) -> None:
        """From now on every step also keeps the inputs of `layers` (`num_layers`: the final normed state) for
        each token in `self.hidden` (hidden-state-fed speculation); () compiles the plain step."""
        self.capture = tuple(layers)
        shardings = dict(self._shardings)
        if layers and shardings:
            shardings["out_shardings"] = (*shardings["out_shardings"], self._plan.replicated())
        paths = self.lora.paths if self.lora is not None else ()
        self._step = jax.jit(partial(_step, self.graphdef, self._treedef, self._plan, lora_paths=paths,
                                     capture=self.capture), donate_argnums=(1,), **shardings)

    def step_shapes(self) -> list[tuple[int, int, int]]:
        """Every (tokens, sequences, pages per sequence) shape `prepare` can produce."""
        tokens = buckets(min(self.min_token_bucket, self.max_num_batched_tokens), self.max_num_batched_tokens)
        pages = buckets(min(self.min_page_bucket, self.max_pages_per_seq), self.max_pages_per_seq)
        return [(t, s, p) for t in tokens for s in self._seq_buckets(t) for p in pages]

    def _seq_buckets(self, token_pad: int) -> list[int]:
        """The sequence paddings a step of `token_pad` tokens can take."""
        most = min(token_pad, self.max_num_seqs)
        return buckets(min(self.min_token_bucket, most), most) if self.tight_buckets else [most]

    def expanded_shapes(self) -> list[tuple[int, int, int]]:
        """The step shapes that can hold an MLA chunk long enough for the expanded form (`mla_prefill.py`)."""
        if not self.expanded_prefill_tokens:
            return []
        return [shape for shape in self.step_shapes() if shape[0] >= self.expanded_prefill_tokens]

    def _padded(self, num_tokens: int, num_seqs: int, num_pages: int) -> tuple[int, int, int]:
        token_pad = bucket(max(num_tokens, num_seqs), self.min_token_bucket, self.max_num_batched_tokens)
        seq_pad = min(token_pad, self.max_num_seqs)
        if self.tight_buckets:
            seq_pad = bucket(num_seqs, min(self.min_token_bucket, seq_pad), seq_pad)
        return token_pad, seq_pad, bucket(num_pages, self.min_page_bucket, self.max_pages_per_seq)

    @staticmethod
    def empty_inputs(shape: tuple[int, int, int], *, mrope: bool = False, spans: bool = False) -> StepInputs:
        """All-padding inputs of `shape` (no sequence): what warm-up runs to compile a shape (`spans`: with
        `visible_until`). Its rows name slot 0, which is harmless: a sequence's state is read only after its own
        first step wrote it."""
        token_pad, seq_pad, page_pad = shape
        meta = PagedMetadata(np.zeros(seq_pad + 1, np.int32), np.zeros(seq_pad, np.int32),
                             np.zeros((seq_pad, page_pad), np.int32), np.int32(0),
                             np.zeros(token_pad, np.int32) if spans else None)
        rope = np.zeros((3, token_pad), np.int32) if mrope else None  # M-RoPE models' steps carry [3, T] positions
        batch = PagedBatch(positions=np.zeros(token_pad, np.int32), seq_lens=np.zeros(token_pad, np.int32), meta=meta,
                           slots=np.zeros(seq_pad, np.int32), rope_positions=rope)
        return StepInputs(np.zeros(token_pad, np.int32), np.full(token_pad, -1, np.int32), batch,
                          np.zeros(seq_pad, np.int32))

    def prepare(self, scheduled: list[ScheduledSequence]) -> StepInputs:
        """The step's host arrays for `scheduled` (every sequence holding a slot), padded to its bucket shape."""
        num_tokens = sum(item.num_new_tokens for item in scheduled)
        shape = self._padded(num_tokens, len(scheduled), max(len(item.seq.pages) for item in scheduled))
        inputs = self.inputs.build(scheduled, shape)
        first = expanded_from(inputs.batch.meta, self.expanded_prefill_tokens)
        if first is not None:
            inputs.batch = inputs.batch.replace(expanded_from=np.int32(first))
        return inputs

    def step_args(self, inputs: StepInputs) -> tuple:
        """The jitted step's arguments for `inputs`, in order."""
        args = (self.params, self.kv_caches, inputs.input_ids, inputs.feed, self.fed_tokens, inputs.batch,
                inputs.logits_indices, inputs.merged)
        if self.lora is None:
            return args
        slots = inputs.lora_slots if inputs.lora_slots is not None else np.full(inputs.input_ids.shape, -1, np.int32)
        return (*args, (self.lora.stacks, slots))

    def run(self, inputs: StepInputs) -> jax.Array:
        """Dispatch the step on prepared inputs (the KV cache is donated and replaced); logits `[S_pad, V]`,
        row i for the i-th sequence (left on the device, not waited for)."""
        # Steps with image rows, or with MLA rows in the expanded form, are their own compiled variants of the shape.
        shape = inputs.variant
        make_room_for(shape, self.compiled_shapes)
        start = time.perf_counter()
        logits, self.kv_caches, *hidden = self._step(*self.step_args(inputs))
        if hidden:
            self.hidden = hidden[0]
        if shape not in self.compiled_shapes:
            self.compiled_shapes.add(shape)
            logits.block_until_ready()
            logger.info(
                "compiled step for tokens=%d seqs=%d pages/seq=%d%s in %.1fs (%d shapes so far)",
                *shape[:3], "".join(f" with {v}" for v in shape[3:]), time.perf_counter() - start,
                len(self.compiled_shapes),
            )
        return logits
