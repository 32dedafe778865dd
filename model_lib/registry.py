"""Registry: Hugging Face `architectures[0]` -> family (config mapping + weight map).

One table, imported lazily. Adding a Llama-like architecture is one row here plus
a config mapping in `model_lib/families/`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.weight_map import IDENTITY, WeightMap


@dataclass(frozen=True)
class Family:
    """How to build and load one family: HF config -> ModelConfig, and tensor names."""

    name: str
    config_from_hf: Callable[[PretrainedConfig, str], ModelConfig]
    weight_map: WeightMap = IDENTITY
    quirks: str = ""  # what sets it apart, for the README table
    # The checkpoint's config.json names a model_type only remote code defines
    # (InternLM2, Baichuan, Qwen 1, ChatGLM): read it as plain fields.
    remote_code: bool = False


# architecture -> "module:ATTRIBUTE" of its Family
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "model_lib.families.llama:LLAMA",
    "MistralForCausalLM": "model_lib.families.llama:MISTRAL",
    "Qwen2ForCausalLM": "model_lib.families.llama:QWEN2",
    "Qwen3ForCausalLM": "model_lib.families.llama:QWEN3",
    "GraniteForCausalLM": "model_lib.families.llama:GRANITE",
    "Gemma3ForCausalLM": "model_lib.families.gemma:GEMMA3",
    "Phi3ForCausalLM": "model_lib.families.phi3:PHI3",
    "GPTBigCodeForCausalLM": "model_lib.families.gpt_bigcode:GPT_BIGCODE",
    "InternLMForCausalLM": "model_lib.families.internlm:INTERNLM",
    "InternLM2ForCausalLM": "model_lib.families.internlm:INTERNLM2",
    "InternLM3ForCausalLM": "model_lib.families.internlm:INTERNLM3",
    "BaichuanForCausalLM": "model_lib.families.baichuan:BAICHUAN",
    "BaiChuanForCausalLM": "model_lib.families.baichuan:BAICHUAN",
    "QWenLMHeadModel": "model_lib.families.qwen:QWEN",
    "ChatGLMModel": "model_lib.families.chatglm:CHATGLM",
    "ChatGLMForConditionalGeneration": "model_lib.families.chatglm:CHATGLM",
}


class UnknownArchitectureError(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def get_family(architecture: str) -> Family:
    try:
        target = ARCHITECTURES[architecture]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        ) from None
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


def architecture_table() -> str:
    """The supported-architecture table of the README, generated from the registry."""
    rows = ["| HF architecture | family | what it exercises |", "|---|---|---|"]
    for architecture in supported_architectures():
        family = get_family(architecture)
        rows.append(f"| `{architecture}` | {family.name} | {family.quirks} |")
    return "\n".join(rows)
