"""The trainer: learning a synthetic task, exact resume, packing, masking, sharding."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_lib
from model_lib.layers.moe import capture_router_logits, collect_router_logits, expert_layers, router_aux_loss
from model_lib.lora import load_peft_adapter
from tests.hlo_checks import all_gathered_shapes
from tests.processes import finish, start_processes
from tests.tiny_models import build_tokenizer
from training.config import TrainConfig
from training.data import IGNORE, DataConfig, make_batch, pack_rows, to_example
from training.trainer import Trainer, token_loss, train

BASE = "llama-gqa"


@pytest.fixture(scope="module")
def reverse_task(tiny_checkpoint, tmp_path_factory):
    """Reverse three letters: 'abc>' -> 'cba'. 400 training words, 64 held out."""
    folder, _ = tiny_checkpoint(BASE)
    words = ["".join(p) for p in itertools.product("abcdefgh", repeat=3)]
    random.Random(0).shuffle(words)
    data = tmp_path_factory.mktemp("reverse") / "train.jsonl"
    data.write_text("".join(json.dumps({"input": w + ">", "output": w[::-1]}) + "\n" for w in words[:400]))
    return folder, data, words[400:464]


def _config(folder, data, output_dir, **overrides) -> TrainConfig:
    values = dict(
        model_name_or_path=str(folder), training_data_path=str(data), output_dir=str(output_dir),
        peft_method="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
        max_steps=300, per_device_train_batch_size=32, learning_rate=3e-3, warmup_steps=10,
        max_seq_length=16, torch_dtype="float32", progress_bar=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def greedy_accuracy(model, words: list[str]) -> float:
    """Exact match of a 3-letter greedy answer (dense forward, so it also covers NF4 bases)."""
    tokenizer = build_tokenizer()
    ids = np.array([tokenizer.encode(w + ">") for w in words], np.int32)
    forward = jax.jit(lambda m, x: m(x))
    for _ in range(3):
        logits = forward(model, jnp.asarray(ids))
        ids = np.concatenate([ids, np.asarray(logits[:, -1].argmax(-1))[:, None]], axis=1)
    answers = [tokenizer.decode(row[4:]) for row in ids]
    return float(np.mean([a == w[::-1] for a, w in zip(answers, words)]))


def assert_expert_adapters_trained(model) -> None:
    """Every routed expert stack (gate, up, down per MoE layer) carries an adapter whose B moved off zero."""
    trained = [float(jnp.abs(s.lora_b[...]).max()) for s in expert_layers(model).values() if s.lora_b is not None]
    assert len(trained) == 3 * sum(model.config.moe_layers) and min(trained) > 0


def _launch(folder, data, out, *extra: str) -> dict:
    """Run the `train` launcher (LoRA preset) on the reverse task; return its summary line."""
    cmd = [sys.executable, "-m", "training.cli", "--config", "configs/lora.yaml", "--model_name_or_path", str(folder),
           "--training_data_path", str(data), "--output_dir", str(out), "--lora_dropout", "0", "--max_steps", "300",
           "--per_device_train_batch_size", "32", "--learning_rate", "3e-3", "--warmup_ratio", "0.03",
           "--max_seq_length", "16", "--torch_dtype", "float32", "--save_steps", "0", "--eval_steps", "0",
           "--progress_bar", "false", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# Routed experts through PEFT's `target_parameters` (the parameters' names as transformers 5 holds them).
DEEPSEEK_EXPERTS = "mlp.experts.gate_up_proj,mlp.experts.down_proj"


@pytest.mark.parametrize("case,target_parameters", [(BASE, None), ("mixtral-moe", None),
                                                    ("llama4-chunked-nope-moe", None),
                                                    ("deepseek_v3-noaux-yarn", DEEPSEEK_EXPERTS),
                                                    # CI trains this hybrid through QLoRA below.
                                                    pytest.param("granitemoehybrid-nope", None, marks=pytest.mark.slow),
                                                    pytest.param("qwen3_next-hybrid", None, marks=pytest.mark.slow),
                                                    pytest.param("recurrentgemma-local-mqa", None,
                                                                 marks=pytest.mark.slow)])
def test_lora_with_the_train_launcher_learns_the_task(case, target_parameters, reverse_task, tiny_checkpoint, tmp_path):
    """Dense and mixture-of-experts bases (all-linear: Mixtral adapts its attention projections, Llama 4 also its
    dense and shared-expert MLPs, DeepSeek-V3 (MLA, sigmoid grouped router, shared experts, a dense first
    layer) every linear layer and its routed experts through `--target_parameters`; GraniteMoeHybrid its
    Mamba-2 mixers' projections too, Qwen3-Next its Gated DeltaNet's, RecurrentGemma its recurrent blocks').
    DeepSeek-V3: 0.953 held-out accuracy through the Trainer API before."""
    _, data, held_out = reverse_task
    folder, _ = tiny_checkpoint(case)
    base = model_lib.from_pretrained(folder)
    assert greedy_accuracy(base, held_out) < 0.1
    out = tmp_path / "lora"
    summary = _launch(folder, data, out, *(("--target_parameters", target_parameters) if target_parameters else ()))
    assert summary["steps"] == 300
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "metrics.jsonl").is_file()
    tuned = model_lib.from_pretrained(folder)
    config = load_peft_adapter(tuned, out)
    if target_parameters:  # every routed expert stack got a trained adapter
        assert config.target_parameters == sorted(target_parameters.split(","))
        assert_expert_adapters_trained(tuned)
    assert greedy_accuracy(tuned, held_out) >= 0.9


def test_router_aux_loss_joins_the_full_fine_tuning_loss(reverse_task, tiny_checkpoint, tmp_path):
    """`output_router_logits` adds coef x the load-balancing loss (checked against transformers in
    tests/model_lib/test_moe.py) to each step's mean cross entropy."""
    _, data, _ = reverse_task
    folder, _ = tiny_checkpoint("mixtral-moe")
    settings = dict(peft_method="none", max_steps=1, per_device_train_batch_size=8)
    plain = Trainer(_config(folder, data, tmp_path / "plain", **settings))
    with_aux = Trainer(_config(folder, data, tmp_path / "aux", output_router_logits=True, router_aux_loss_coef=0.5, **settings))
    batch = jax.tree.map(jnp.asarray, plain.micro_batch(0))
    model = model_lib.from_pretrained(folder)
    collect_router_logits(model)
    _, router_logits = capture_router_logits(token_loss)(model, batch)
    aux = float(router_aux_loss(model.config, router_logits, batch.segment_ids != 0))
    assert aux > 1.0  # X * sum(fraction * prob) is k=2 when perfectly balanced
    difference = with_aux.train().losses[0] - plain.train().losses[0]
    np.testing.assert_allclose(difference, 0.5 * aux, rtol=1e-4)


@pytest.mark.parametrize("method,steps", [("none", 150), ("qlora", 300)])
def test_full_and_qlora_learn_the_task(method, steps, reverse_task, tmp_path):
    folder, data, held_out = reverse_task
    trainer = Trainer(_config(folder, data, tmp_path / method, peft_method=method, max_steps=steps, merge_lora=False))
    result = trainer.train()
    assert result.losses[-1] < result.losses[0]
    assert greedy_accuracy(trainer.trained_model(), held_out) >= 0.9
    if method == "none":
        exported = model_lib.from_pretrained(tmp_path / method)
        assert greedy_accuracy(exported, held_out) >= 0.9
    else:
        lora_bytes = Trainer(_config(folder, data, tmp_path / "bf16", torch_dtype="bfloat16", max_steps=1)).param_bytes
        assert result.param_bytes < lora_bytes


def test_qlora_trains_granite_moe_hybrid(reverse_task, tiny_checkpoint, tmp_path):
    """QLoRA on Granite 4.0 (Mamba-2 mixers, NoPE attention, MoE): the trainer's base holds NF4 mixer and
    attention projections, whose logits stay within 0.05 of the float base's (max |logit| about 1), and
    the loss falls over 40 steps."""
    _, data, _ = reverse_task
    folder, _ = tiny_checkpoint("granitemoehybrid-nope")
    trainer = Trainer(_config(folder, data, tmp_path / "qlora", peft_method="qlora", max_steps=40,
                              per_device_train_batch_size=8, merge_lora=False))
    layers = trainer.model.model.layers
    assert layers[0].mixer.in_proj.quantized is not None and layers[0].mixer.in_proj.kernel is None
    assert layers[1].self_attn.q_proj.quantized is not None
    ids = jnp.asarray(np.random.RandomState(3).randint(1, 64, (2, 12)), jnp.int32)
    forward = jax.jit(lambda m, x: m(x))
    float_logits = np.asarray(forward(model_lib.from_pretrained(folder, dtype="float32"), ids))
    nf4_logits = np.asarray(forward(model_lib.from_pretrained(folder, dtype="float32", quantization="nf4"), ids))
    assert 0 < np.abs(nf4_logits - float_logits).max() < 0.05
    losses = trainer.train().losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses  # 4.85 -> 4.62 (Granite's scaled logits learn slowly)


def test_interrupt_and_resume_reproduce_the_loss_curve(reverse_task, tmp_path):
    folder, data, _ = reverse_task
    settings = dict(max_steps=12, lora_dropout=0.1, gradient_accumulation_steps=2, per_device_train_batch_size=8,
                    save_steps=0, validation_split=0.1, eval_steps=4)
    straight = train(_config(folder, data, tmp_path / "straight", **settings))

    interrupted_config = _config(folder, data, tmp_path / "resumed", **settings)
    trainer = Trainer(interrupted_config)
    step = trainer.train_step
    calls = {"n": 0}

    def step_then_sigterm(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer saves and stops after this step
        return step(*args)

    trainer.train_step = step_then_sigterm
    first = trainer.train()
    assert first.interrupted and first.steps == 5
    assert not (tmp_path / "resumed" / "adapter_config.json").exists()
    second = train(interrupted_config)
    assert second.steps == 12
    np.testing.assert_array_equal(first.losses + second.losses, straight.losses)
    assert second.eval_losses == [e for e in straight.eval_losses if e[0] > 5]


def _packed_and_unpacked(folder):
    model = model_lib.from_pretrained(folder)
    tokenizer = build_tokenizer()
    examples = [to_example({"input": "x" * (i % 5 + 1), "output": "yz" * (i % 3 + 1)}, tokenizer, DataConfig(), "t") for i in range(9)]
    unpacked = make_batch(pack_rows(examples, 16, packing=False), 16)
    packed = make_batch(pack_rows(examples, 16, packing=True), 16)
    assert packed.input_ids.shape[0] < unpacked.input_ids.shape[0]
    return model, packed, unpacked


@pytest.mark.parametrize("case", [BASE, "recurrentgemma-local-mqa"])
def test_packing_does_not_change_the_loss(case, tiny_checkpoint):
    """Packed rows restart attention and recurrent state at each segment (RecurrentGemma: the RG-LRU's reset
    and conv window). (tests/model_lib/test_ssm_models.py checks packed logits for the other state-space models.)"""
    model, packed, unpacked = _packed_and_unpacked(tiny_checkpoint(case)[0])
    loss = nnx.jit(token_loss)
    loss_u, n_u = loss(model, unpacked)
    loss_p, n_p = loss(model, packed)
    assert int(n_u) == int(n_p)
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)


def test_masked_targets_do_not_change_the_loss(tiny_checkpoint):
    """Masked positions: whatever token stands there as a target, the loss and its gradient ignore it."""
    model, _, unpacked = _packed_and_unpacked(tiny_checkpoint(BASE)[0])
    loss_u, _ = token_loss(model, unpacked)
    changed = np.where(unpacked.targets == IGNORE, 7, unpacked.targets)
    logits = model(unpacked.input_ids, segment_ids=unpacked.segment_ids)
    import optax

    def from_logits(lg):
        mask = unpacked.targets != IGNORE
        ce = optax.softmax_cross_entropy_with_integer_labels(lg, jnp.asarray(changed))
        return jnp.sum(ce * mask)

    grad = np.asarray(jax.grad(from_logits)(logits))
    assert not grad[unpacked.targets == IGNORE].any()
    np.testing.assert_allclose(float(from_logits(logits)), float(loss_u), rtol=1e-6)


def test_sharded_training_matches_single_device(reverse_task, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 simulated devices (tests/conftest.py sets XLA_FLAGS)")
    folder, data, _ = reverse_task
    common = dict(max_steps=4, peft_method="none", learning_rate=1e-3, save_steps=0)
    single = train(_config(folder, data, tmp_path / "single", per_device_train_batch_size=8, **common))
    # fsdp_tp on 8 devices: fsdp 4 x tensor 2, so 2 rows per device make the same global batch of 8.
    sharded = train(_config(folder, data, tmp_path / "sharded", per_device_train_batch_size=2, mesh="fsdp_tp", **common))
    np.testing.assert_allclose(sharded.losses, single.losses, rtol=2e-5)


def _train_in_two_processes(config: TrainConfig, timeout: float = 300) -> None:
    """`train` as 2 jax.distributed processes of 4 CPU devices each on 127.0.0.1 (one global mesh of 8)."""
    flags = [f"--{k}={','.join(v) if isinstance(v, list) else v}" for k, v in config.to_dict().items() if v is not None]
    finish(start_processes(lambda i, coordinator: [
        "-m", "training.cli", *flags, f"--coordinator_address={coordinator}", "--num_processes=2", f"--process_id={i}"
    ]), timeout)


def test_two_processes_train_like_one_and_resume_from_their_checkpoint(reverse_task, tmp_path):
    """2 processes x 4 devices give the 8-device single-process losses; their orbax checkpoint resumes."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 simulated devices (tests/conftest.py sets XLA_FLAGS)")
    folder, data, _ = reverse_task
    # Full fine-tuning: fsdp-sharded parameters and optimizer state, so every process saves its own shards.
    common = dict(peft_method="none", learning_rate=1e-3, lr_scheduler_type="constant", per_device_train_batch_size=2,
                  mesh="fsdp_tp", logging_steps=1)
    single = train(_config(folder, data, tmp_path / "single", max_steps=4, **common))
    _train_in_two_processes(_config(folder, data, tmp_path / "multi", max_steps=2, **common))  # saves at step 2
    _train_in_two_processes(_config(folder, data, tmp_path / "multi", max_steps=4, **common))  # resumes at step 2
    records = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in records], single.losses, rtol=2e-5)
    # The leader gathered the sharded parameters and exported them.
    exported = model_lib.from_pretrained(tmp_path / "multi")
    reference = model_lib.from_pretrained(tmp_path / "single")
    ids = np.arange(24, dtype=np.int32).reshape(2, 12) % exported.config.vocab_size
    np.testing.assert_allclose(np.asarray(exported(ids)), np.asarray(reference(ids)), rtol=1e-4, atol=1e-5)


def test_multi_process_is_requested_by_flags_or_the_cluster_environment():
    from model_lib.distributed import initialize, multi_process_requested

    assert not multi_process_requested(None, None, None, {})
    assert not multi_process_requested(None, None, None, {"SLURM_NTASKS": "1"})
    assert multi_process_requested(None, None, None, {"SLURM_NTASKS": "4"})
    assert multi_process_requested(None, None, None, {"JAX_COORDINATOR_ADDRESS": "host0:1234"})
    assert multi_process_requested("host0:1234", 2, 0, {})
    assert initialize(environ={}) is False  # a single process never initializes
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        initialize("127.0.0.1:1", 2, 5, environ={})


def test_tensor_parallel_step_never_gathers_a_whole_parameter(tiny_checkpoint, reverse_task, tmp_path):
    """The compiled LoRA step on `tp` (8 heads over 8 devices) keeps every tensor-sharded base weight split."""
    import shutil

    import transformers
    from jax.sharding import NamedSharding, PartitionSpec

    if jax.device_count() < 8:
        pytest.skip("needs 8 simulated devices (tests/conftest.py sets XLA_FLAGS)")
    _, data, _ = reverse_task
    source, _ = tiny_checkpoint(BASE)
    folder = tmp_path / "heads8"
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(source / name, folder / name)
    trainer = Trainer(_config(folder, data, tmp_path / "out", mesh="tp", max_steps=1, per_device_train_batch_size=2))
    batch = trainer._device_batch([trainer.micro_batch(0)])
    hlo = trainer.train_step.lower(trainer.trainable, trainer.opt_state, trainer.rng_state, trainer.frozen, batch, 0).compile().as_text()
    split = {tuple(x.shape) for x in jax.tree.leaves(trainer.frozen) if "tensor" in str(x.sharding.spec)}
    assert (64, 256) in split and (256, 64) in split  # q_proj and o_proj: 8 whole heads of 32 over 8 devices
    assert not split & all_gathered_shapes(hlo), split & all_gathered_shapes(hlo)
    assert not [s for s in all_gathered_shapes(hlo) if len(s) == 4]  # attention's q/k/v stay split by heads
    # The check sees a gather when there is one: replicating q_proj gathers its whole [64, 256].
    q = trainer.frozen["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
    gather = jax.jit(lambda w: w * 2, out_shardings=NamedSharding(trainer.plan.mesh, PartitionSpec()))
    assert (64, 256) in all_gathered_shapes(gather.lower(q).compile().as_text())


def test_block_diffusion_fine_tuning_is_refused_by_name(reverse_task, tiny_checkpoint, tmp_path):
    """SDAR trains on a masked-diffusion objective the trainer lacks; its next-token loss would see the labels."""
    _, data, _ = reverse_task
    folder, _ = tiny_checkpoint("sdar-block-causal")
    with pytest.raises(NotImplementedError, match="SDARForCausalLM: fine-tuning a block diffusion model"):
        Trainer(_config(folder, data, tmp_path / "sdar"))
