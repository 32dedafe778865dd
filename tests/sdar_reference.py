"""Tiny SDAR checkpoints in the remote-code layout, and their torch reference.

transformers has no SDAR class. The reference is JetAstra/SDAR's remote code
(`training/model/SDAR-4B-Chat/modeling_sdar.py`: a Qwen3 network whose attention takes a
block-causal mask) and the repository's `generate.py` (`block_diffusion_generate`), written
here from their math on transformers' own Qwen3 layers: the remote `SDARAttention`,
`SDARMLP`, `SDARRMSNorm` and rotary are Qwen3's, with the mask supplied from outside.

Decoding, as `block_diffusion_generate` does it: the sequence is cut into blocks of
`block_size`; the blocks the prompt fills are prefilled; every later block (the first one
holding the prompt's tail, if any) starts as `mask_token_id` and is denoised in passes
over the block (it sees every earlier block and all of itself); each pass predicts every
position, then commits some masked ones (`num_transfer_tokens`: block_size // steps,
the remainder spread over the first steps) chosen by the remasking strategy; when no
mask is left the block is final and the next one starts, unless a stop token appeared.
The reference recomputes the whole sequence under the block-causal mask each pass instead
of keeping the remote KV cache: the same numbers, since committed blocks never change.

Three points where the published loop is undefined or breaks, and what we do:
- a position is masked until a pass commits it, even to `mask_token_id` (the published loop
  compares tokens with the mask id, so a predicted mask token would stay masked);
- greedy (temperature 0): the token is the argmax and its confidence the softmax
  probability of the unscaled logits (lmdeploy's SDAR unmasking scores it so); the
  published sampler divides by the temperature and samples;
- `torch.topk(confidence, n)` with fewer than n masked positions left (a block whose head
  is prompt, steps not dividing the block) would pick unmasked positions and overwrite
  them; we commit min(n, masked) positions, as later SDAR forks do.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from torch import nn
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from tests.own_reference import write_remote_checkpoint
from tests.tiny_models import VOCAB, TinyCase

ARCHITECTURE = "SDARForCausalLM"
LOGIT_GAIN = 30.0


def block_causal_mask(length: int, block_size: int) -> torch.Tensor:
    """Additive `[1, 1, T, T]` mask: query i sees key j when j's block is not after i's."""
    blocks = torch.arange(length) // block_size
    return torch.where(blocks[None, :] <= blocks[:, None], 0.0, float("-inf"))[None, None]


def num_transfer_tokens(block_size: int, steps: int) -> list[int]:
    """How many positions each denoising pass commits (`get_num_transfer_tokens`)."""
    base, remainder = divmod(block_size, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


class SDARReference(nn.Module):
    """`SDARForCausalLM` forward under the block-causal mask, and block diffusion decoding."""

    def __init__(self, config: transformers.Qwen3Config, block_size: int, mask_token_id: int):
        super().__init__()
        config._attn_implementation = "eager"
        self.config, self.block_size, self.mask_token_id = config, block_size, mask_token_id
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.model.rotary_emb = Qwen3RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        length = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        position_embeddings = self.model.rotary_emb(x, torch.arange(length)[None])
        mask = block_causal_mask(length, self.block_size)
        for layer in self.model.layers:
            x = layer(x, attention_mask=mask, position_embeddings=position_embeddings)
        return SimpleNamespace(logits=self.lm_head(self.model.norm(x)))

    @torch.no_grad()
    def block_diffusion_generate(self, prompt: list[int], *, gen_length: int, denoising_steps: int,
                                 remasking_strategy: str = "low_confidence_static",
                                 confidence_threshold: float = 0.85, stop_token_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy `block_diffusion_generate` of one prompt: the whole sequence, last block included."""
        size, steps = self.block_size, denoising_steps
        total = -(-(len(prompt) + gen_length) // size) * size
        x = torch.full((1, total), self.mask_token_id, dtype=torch.long)
        x[0, : len(prompt)] = torch.tensor(prompt)
        transfers = num_transfer_tokens(size, steps)
        pending = torch.arange(total) >= len(prompt)
        for block in range(len(prompt) // size, total // size):
            start, end = block * size, (block + 1) * size
            for step in range(steps + 1):
                masked = pending[start:end].clone()
                if not masked.any():
                    break
                logits = self(x[:, :end]).logits[0, start:end].float()
                tokens = logits.argmax(-1)
                confidence = torch.softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
                confidence = torch.where(masked, confidence, float("-inf"))
                count = min(transfers[step], int(masked.sum()))
                if remasking_strategy == "sequential":
                    chosen = masked.nonzero()[:count, 0]
                elif remasking_strategy == "low_confidence_static":
                    chosen = confidence.topk(count).indices
                elif remasking_strategy == "low_confidence_dynamic":
                    confident = confidence > confidence_threshold
                    chosen = confident.nonzero()[:, 0] if int(confident.sum()) >= count else confidence.topk(count).indices
                else:
                    raise ValueError(f"unknown remasking strategy {remasking_strategy!r}")
                x[0, start + chosen] = tokens[chosen]
                pending[start + chosen] = False
            if any(int(t) in stop_token_ids for t in x[0, len(prompt) : end]):
                return x[0, :end].tolist()
        return x[0].tolist()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False, **_) -> torch.Tensor:
        """The serving view of greedy block diffusion with the checkpoint's defaults (`SDAR_DEFAULTS`):
        the prompt, then the generated tokens up to and including the first EOS, at most `max_new_tokens`."""
        assert not do_sample and input_ids.shape[0] == 1
        prompt = input_ids[0].tolist()
        eos = self.config.eos_token_id
        eos = tuple(eos if isinstance(eos, list) else [eos])
        out = self.block_diffusion_generate(prompt, gen_length=max_new_tokens, stop_token_ids=eos, **SDAR_DEFAULTS)
        generated = out[len(prompt) :]
        for i, token in enumerate(generated):
            if token in eos:
                generated = generated[: i + 1]
                break
        return torch.tensor([prompt + generated[:max_new_tokens]])


# What `LLM.generate` decodes with by default (`BlockDiffusionParams()`: as many passes as the block has
# positions, most confident first) on the tiny case's blocks of 4; the generic serving tables compare with it.
SDAR_DEFAULTS = dict(denoising_steps=4, remasking_strategy="low_confidence_static")


def sdar_config_json(qwen3: transformers.Qwen3Config, block_size: int, mask_token_id: int) -> dict:
    """config.json of an SDAR checkpoint, with the keys and legacy rotary fields the published ones carry."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "sdar",
        "auto_map": {
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModel": "modeling_sdar.SDARModel",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
        "vocab_size": qwen3.vocab_size,
        "hidden_size": qwen3.hidden_size,
        "intermediate_size": qwen3.intermediate_size,
        "num_hidden_layers": qwen3.num_hidden_layers,
        "num_attention_heads": qwen3.num_attention_heads,
        "num_key_value_heads": qwen3.num_key_value_heads,
        "head_dim": qwen3.head_dim,
        "hidden_act": qwen3.hidden_act,
        "max_position_embeddings": qwen3.max_position_embeddings,
        "rms_norm_eps": qwen3.rms_norm_eps,
        "rope_theta": qwen3.rope_parameters["rope_theta"],
        "rope_scaling": None,
        "attention_bias": qwen3.attention_bias,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": qwen3.num_hidden_layers,
        "tie_word_embeddings": qwen3.tie_word_embeddings,
        "initializer_range": qwen3.initializer_range,
        "bos_token_id": qwen3.bos_token_id,
        "eos_token_id": qwen3.eos_token_id,
        "pad_token_id": qwen3.pad_token_id,
        "block_size": block_size,
        "mask_token_id": mask_token_id,
        "fuse_cross_entropy": True,
        "torch_dtype": "float32",
        "use_cache": False,
    }


def build_sdar_checkpoint(case: TinyCase, folder: Path) -> SDARReference:
    """Write the case as an SDAR checkpoint (config.json, safetensors, tokenizer); return its reference.

    The case's overrides hold Qwen3 fields plus `block_size` and `mask_token_id`.
    """
    overrides = dict(case.overrides)
    block_size, mask_token_id = overrides.pop("block_size"), overrides.pop("mask_token_id")
    qwen3 = transformers.Qwen3Config(**{**case.dims, **overrides})
    torch.manual_seed(0)
    model = SDARReference(qwen3, block_size, mask_token_id).float().eval()
    with torch.no_grad():  # transformers' initialisation, then every parameter perturbed so that each matters
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=qwen3.initializer_range)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.02))
        # Decisive logits: confidences spread well apart, so float rounding never reorders a remasking choice.
        model.lm_head.weight.mul_(LOGIT_GAIN)
    tensors = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    if qwen3.tie_word_embeddings:
        del tensors["lm_head.weight"]
    write_remote_checkpoint(folder, tensors, sdar_config_json(qwen3, block_size, mask_token_id))
    model.config.architectures = [ARCHITECTURE]
    assert qwen3.vocab_size == VOCAB
    return model
