"""Registry: Hugging Face `architectures[0]` -> family (config mapping + weight map).

One table, imported lazily. Adding a Llama-like architecture is one row here plus
a config mapping in `model_lib/families/`.
"""

from __future__ import annotations

import dataclasses
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
    # Where tensor names depend on the variant (Falcon-40B's ln_attn/ln_mlp): config -> weight map.
    weight_map_for: Callable[[ModelConfig], WeightMap] | None = None

    def for_config(self, config: ModelConfig) -> "Family":
        """This family with the weight map of `config`'s variant."""
        if self.weight_map_for is None:
            return self
        return dataclasses.replace(self, weight_map=self.weight_map_for(config), weight_map_for=None)


# architecture -> "module:ATTRIBUTE" of its Family
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "model_lib.families.llama:LLAMA",
    "MistralForCausalLM": "model_lib.families.llama:MISTRAL",
    "Qwen2ForCausalLM": "model_lib.families.llama:QWEN2",
    "Qwen3ForCausalLM": "model_lib.families.llama:QWEN3",
    "GraniteForCausalLM": "model_lib.families.llama:GRANITE",
    "GemmaForCausalLM": "model_lib.families.gemma:GEMMA",
    "Gemma2ForCausalLM": "model_lib.families.gemma:GEMMA2",
    "Gemma3ForCausalLM": "model_lib.families.gemma:GEMMA3",
    "Starcoder2ForCausalLM": "model_lib.families.starcoder2:STARCODER2",
    "NemotronForCausalLM": "model_lib.families.nemotron:NEMOTRON",
    "Exaone4ForCausalLM": "model_lib.families.exaone4:EXAONE4",
    "GlmForCausalLM": "model_lib.families.glm:GLM",
    "Glm4ForCausalLM": "model_lib.families.glm:GLM4",
    "Glm4vForConditionalGeneration": "model_lib.families.qwen_vl:GLM4V",
    "CohereForCausalLM": "model_lib.families.cohere:COHERE",
    "Phi3ForCausalLM": "model_lib.families.phi3:PHI3",
    "GPTBigCodeForCausalLM": "model_lib.families.gpt_bigcode:GPT_BIGCODE",
    "MiniCPM3ForCausalLM": "model_lib.families.minicpm3:MINICPM3",
    "GPT2LMHeadModel": "model_lib.families.gpt2:GPT2",
    "GPTJForCausalLM": "model_lib.families.gpt2:GPTJ",
    "GPTNeoXForCausalLM": "model_lib.families.gpt_neox:GPT_NEOX",
    "PhiForCausalLM": "model_lib.families.phi:PHI",
    "OPTForCausalLM": "model_lib.families.opt:OPT",
    "FalconForCausalLM": "model_lib.families.bloom:FALCON",
    "BloomForCausalLM": "model_lib.families.bloom:BLOOM",
    "MptForCausalLM": "model_lib.families.mpt:MPT",
    "DeciLMForCausalLM": "model_lib.families.deci:DECI",
    "NemotronNASForCausalLM": "model_lib.families.deci:DECI",  # TensorRT-LLM's name for the same checkpoints
    "InternLMForCausalLM": "model_lib.families.internlm:INTERNLM",
    "InternLM2ForCausalLM": "model_lib.families.internlm:INTERNLM2",
    "InternLM3ForCausalLM": "model_lib.families.internlm:INTERNLM3",
    "BaichuanForCausalLM": "model_lib.families.baichuan:BAICHUAN",
    "BaiChuanForCausalLM": "model_lib.families.baichuan:BAICHUAN",
    "QWenLMHeadModel": "model_lib.families.qwen:QWEN",
    "ChatGLMModel": "model_lib.families.chatglm:CHATGLM",
    "ChatGLMForConditionalGeneration": "model_lib.families.chatglm:CHATGLM",
    "MixtralForCausalLM": "model_lib.families.mixtral:MIXTRAL",
    "Qwen2MoeForCausalLM": "model_lib.families.qwen_moe:QWEN2_MOE",
    "Qwen3MoeForCausalLM": "model_lib.families.qwen_moe:QWEN3_MOE",
    "PhimoeForCausalLM": "model_lib.families.mixtral:PHIMOE",
    "DbrxForCausalLM": "model_lib.families.dbrx:DBRX",
    "Glm4MoeForCausalLM": "model_lib.families.glm4_moe:GLM4_MOE",
    "GptOssForCausalLM": "model_lib.families.gpt_oss:GPT_OSS",
    "GraniteMoeForCausalLM": "model_lib.families.granite_moe:GRANITE_MOE",
    "GraniteMoeSharedForCausalLM": "model_lib.families.granite_moe:GRANITE_MOE_SHARED",
    "DeepseekV2ForCausalLM": "model_lib.families.deepseek:DEEPSEEK_V2",
    "DeepseekV3ForCausalLM": "model_lib.families.deepseek:DEEPSEEK_V3",
    "ArcticForCausalLM": "model_lib.families.arctic:ARCTIC",
    "Grok1ModelForCausalLM": "model_lib.families.grok:GROK1",
    "Llama4ForCausalLM": "model_lib.families.llama4:LLAMA4",
    "Llama4ForConditionalGeneration": "model_lib.families.llama4:LLAMA4_CONDITIONAL",
    "LlavaForConditionalGeneration": "model_lib.families.llava:LLAVA",
    "LlavaNextForConditionalGeneration": "model_lib.families.llava:LLAVA_NEXT",
    "LlavaOnevisionForConditionalGeneration": "model_lib.families.llava:LLAVA_ONEVISION",
    "Mistral3ForConditionalGeneration": "model_lib.families.llava:MISTRAL3",
    "InternVLForConditionalGeneration": "model_lib.families.llava:INTERNVL",
    "Gemma3ForConditionalGeneration": "model_lib.families.llava:GEMMA3_VL",
    "MllamaForConditionalGeneration": "model_lib.families.mllama:MLLAMA",
    "Qwen2VLForConditionalGeneration": "model_lib.families.qwen_vl:QWEN_VL",
    "Qwen2_5_VLForConditionalGeneration": "model_lib.families.qwen_vl:QWEN_VL",
    "Qwen3VLForConditionalGeneration": "model_lib.families.qwen_vl:QWEN3_VL",
    "Qwen3VLMoeForConditionalGeneration": "model_lib.families.qwen_vl:QWEN3_VL_MOE",
    "MambaForCausalLM": "model_lib.families.mamba:MAMBA",
    "Mamba2ForCausalLM": "model_lib.families.mamba:MAMBA2",
    "GraniteMoeHybridForCausalLM": "model_lib.families.granite_moe_hybrid:GRANITE_MOE_HYBRID",
    "RecurrentGemmaForCausalLM": "model_lib.families.recurrent_gemma:RECURRENT_GEMMA",
    "Qwen3NextForCausalLM": "model_lib.families.qwen3_next:QWEN3_NEXT",
    "SDARForCausalLM": "model_lib.families.sdar:SDAR",
}


class UnknownArchitectureError(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def get_family(architecture: str) -> Family:
    try:
        target = ARCHITECTURES[architecture]
    except KeyError:
        from model_lib.encdec.weights import seq2seq_family
        from model_lib.encoders.loading import POOLING_ARCHITECTURES

        if (family := seq2seq_family(architecture)) is not None:
            return family  # its weight names (PEFT's modules); model_lib.encdec loads it

        hint = (f" ({architecture} is a pooling model: load it with model_lib.encoders.load_pooling_model, "
                "or serving.LLM / serve, which serve its embed, classify, score or reward task)"
                if architecture in POOLING_ARCHITECTURES else "")
        raise UnknownArchitectureError(
            f"unknown architecture {architecture!r}; supported: {', '.join(supported_architectures())}{hint}"
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


def write_readme_table(readme: str = "README.md") -> None:
    """Replace the README's architecture table (from its header row to the next blank line)."""
    from pathlib import Path

    path = Path(readme)
    lines = path.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| HF architecture |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    path.write_text("\n".join(lines[:start] + architecture_table().split("\n") + lines[end:]))


if __name__ == "__main__":
    write_readme_table()
