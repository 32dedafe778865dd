"""How a family's Hugging Face tensor names map onto our parameter paths.

Most families load by identity because our modules keep HF names. The exceptions
are data, not code:
- `renames`: module-path prefixes that differ (`transformer.h.{i}.ln_1` ->
  `model.layers.{i}.input_layernorm`);
- `fused`: one HF projection that we hold as several (`qkv_proj` -> q/k/v), with
  the output-dimension layout needed to split it on load and join it on save;
- `ignored`: HF tensors that carry nothing we need (cached rotary buffers);
- `conv1d`: HF modules whose weight is stored `[in, out]` (GPT-2's Conv1D);
- `either_layout`: HF modules whose weight some checkpoints store `[in, out]` and others `[out, in]`
  (Qwen3-VL-MoE's fused experts: the hub's files and what transformers 5 saves); read as the
  shape says (`[out, in]` when its last axis is the input width, as transformers decides), saved `[out, in]`;
- `bare_prefix`: the base-model prefix that checkpoints saved from the bare
  base model omit (GPT-2's and BLOOM's own `h.0...`, OPT's `decoder...`).
- `stacked`: per-expert HF modules (`experts.{e}.w1`) that we hold as one module
  with a leading expert axis (`mlp.experts.gate_proj`, kernel `[X, in, out]`);
- `expert_rows`: our expert modules whose HF weight flattens the experts into its
  first axis (`[X * out, in]`, DBRX), reshaped to `[X, out, in]` on load;
- `tensor_renames`: whole tensor names that differ in their last part too
  (gpt-oss's `experts.gate_up_proj` is our `experts.gate_up.weight`).
- `relocated`: module subtrees held elsewhere in our model, applied after the
  mappings above (DeepSeek-V3's MTP block `model.layers.{N}` is our `mtp.0`, so its
  experts stack and its shared experts rename as every layer's do).
- `nested_prefix`: the prefix of the language model's tensors in a multimodal
  checkpoint whose text path we load (Llama 4's `language_model.`), removed on load
  and put back on save; `outer_modules` are the modules beside it (a vision tower) that keep
  their names, and towers we do not load go in `ignored`.
- `peft_experts`: our MoE experts module (`model.layers.{i}.mlp.experts`, holding the
  `gate_proj` / `up_proj` / `down_proj` stacks) where transformers 5 holds the same module
  with fused parameters `gate_up_proj [X, 2I, E]` (gate rows first) and `down_proj [X, E, I]`,
  the layout PEFT's `target_parameters` adapts; empty where PEFT cannot express expert LoRA.
  `peft_experts_hf` is that module's HF path where it differs from ours (Llama 4's
  `feed_forward.experts`), and `peft_experts_layout` how its parameters lie (`PEFT_EXPERT_LAYOUTS`).
- `key_renames`: regex substitutions on whole tensor names, applied first, for checkpoints
  whose top-level layout varies by the transformers version that saved them (LLaVA's
  `language_model.model.` / `model.language_model.`); `relocated` names the save layout.

Separately, every HF `*.weight` of a linear layer is `[out, in]` and ours is
`kernel [in, out]` (the last two axes swap, so `[X, out, in]` expert stacks too); `model_lib/checkpoint.py` handles that for all families,
after `conv1d` weights are brought to `[out, in]` like the rest.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from model_lib.config import ModelConfig

FusedLayout = Callable[[ModelConfig], tuple[int, tuple[int, ...]]]

# How transformers 5 holds a layer's fused expert parameters (`WeightMap.peft_experts_layout`):
# "out_in": `gate_up_proj [X, 2I, E]` (gate rows first), `down_proj [X, E, I]` (DeepSeek, Qwen3-MoE, Mixtral);
# "in_out": `[X, E, 2I]` (gate columns first) and `[X, I, E]` on a module PEFT reads as "out_in" (Llama 4);
# "in_out_interleaved": `[X, E, 2I]` with gate and up columns alternating, on a module that tells PEFT it is
# transposed (`is_transposed`, gpt-oss).
PEFT_EXPERT_LAYOUTS = ("out_in", "in_out", "in_out_interleaved")


@functools.lru_cache(maxsize=None)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """`a.{i}.b` -> a regex matching `a.<digits>.b` with the layer index (and expert `{e}`) captured."""
    escaped = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile("^" + escaped + "$")


def _fill(pattern: str, match: re.Match[str]) -> str:
    return pattern.replace("{i}", match.group("i")) if "{i}" in pattern else pattern


@dataclass(frozen=True)
class Fused:
    """An HF module whose output dimension concatenates several of our modules.

    `layout(config)` returns `(groups, sizes)`: the output dimension is viewed as
    `[groups, sum(sizes) // groups]` and split per group into `sizes // groups`
    (groups > 1 for per-head interleaving, as in GPTBigCode's multi-head `c_attn`).
    `experts=True`: the tensors carry a leading expert axis (`[X, out, in]`, `[X, out]`).
    """

    hf_module: str
    parent: str
    parts: tuple[str, ...]
    layout: FusedLayout
    experts: bool = False

    def split(self, tensor: np.ndarray, config: ModelConfig) -> list[np.ndarray]:
        """Split an HF weight `[out, in]` or bias `[out]` into the parts' HF layouts."""
        groups, sizes = self.layout(config)
        total = sum(sizes)
        lead, rest = tensor.shape[: int(self.experts)], tensor.shape[int(self.experts) + 1 :]
        found = tensor.shape[len(lead)] if tensor.ndim > len(lead) else None
        if found != total:
            raise ValueError(f"output dimension {found}, expected {total} ({'+'.join(map(str, sizes))})")
        grouped = tensor.reshape(*lead, groups, total // groups, *rest)
        bounds = np.cumsum([s // groups for s in sizes])[:-1]
        axis = len(lead) + 1
        return [p.reshape(*lead, size, *rest) for p, size in zip(np.split(grouped, bounds, axis=axis), sizes)]

    def join(self, parts: list[np.ndarray], config: ModelConfig) -> np.ndarray:
        """Inverse of `split`."""
        groups, sizes = self.layout(config)
        n = int(self.experts)
        lead, rest = parts[0].shape[:n], parts[0].shape[n + 1 :]
        grouped = [p.reshape(*lead, groups, s // groups, *rest) for p, s in zip(parts, sizes)]
        joined = np.concatenate(grouped, axis=n + 1)
        return joined.reshape(*lead, sum(sizes), *rest)


@dataclass(frozen=True)
class Stacked:
    """Per-expert HF modules (`hf_module` with `{i}` and `{e}`) held as one module with the expert axis first."""

    hf_module: str
    module: str


@dataclass(frozen=True)
class WeightMap:
    renames: tuple[tuple[str, str], ...] = ()
    fused: tuple[Fused, ...] = ()
    ignored: tuple[str, ...] = (r".*\.rotary_emb\.inv_freq",)
    conv1d: tuple[str, ...] = ()
    either_layout: tuple[str, ...] = ()
    stacked: tuple[Stacked, ...] = ()
    tensor_renames: tuple[tuple[str, str], ...] = ()  # (HF tensor name, our HF-style tensor name)
    expert_rows: tuple[str, ...] = ()
    bare_prefix: str = ""
    relocated: tuple[tuple[str, str], ...] = ()  # (module path as mapped from HF, our module path)
    nested_prefix: str = ""
    outer_modules: tuple[str, ...] = ()  # top-level modules outside `nested_prefix`
    key_renames: tuple[tuple[str, str], ...] = ()  # (regex on the HF tensor name, replacement)
    peft_experts: str = ""
    peft_experts_hf: str = ""
    peft_experts_layout: str = "out_in"

    def __post_init__(self) -> None:
        if self.peft_experts_layout not in PEFT_EXPERT_LAYOUTS:
            raise ValueError(f"peft_experts_layout {self.peft_experts_layout!r}; expected one of {PEFT_EXPERT_LAYOUTS}")

    def peft_experts_module(self, module: str) -> str:
        """The HF path PEFT names for our experts module `module` (under a multimodal `nested_prefix`)."""
        match = _pattern_regex(self.peft_experts).match(module) if self.peft_experts_hf else None
        return self.nested_prefix + (_fill(self.peft_experts_hf, match) if match else module)

    def nested(self, name: str) -> str:
        """Our HF-style tensor or module name as the checkpoint writes it (under `nested_prefix` unless it is in
        one of the `outer_modules`)."""
        if any(name == m or name.startswith(m + ".") for m in self.outer_modules):
            return name
        return self.nested_prefix + name

    def is_peft_experts(self, module: str) -> bool:
        return bool(self.peft_experts) and _pattern_regex(self.peft_experts).match(module) is not None

    def _relocate(self, module: str, inverse: bool = False) -> str:
        for mapped, ours in self.relocated:
            source, target = (ours, mapped) if inverse else (mapped, ours)
            if module == source or module.startswith(source + "."):
                return target + module[len(source) :]
        return module

    def canonical(self, hf_key: str) -> str:
        """`hf_key` with the base-model prefix put back where a bare-model checkpoint left it out
        (and a multimodal checkpoint's `nested_prefix` taken off, `key_renames` applied)."""
        for pattern, replacement in self.key_renames:
            hf_key = re.sub(pattern, replacement, hf_key)
        if self.nested_prefix:
            return hf_key.removeprefix(self.nested_prefix)
        if not self.bare_prefix or hf_key.startswith((self.bare_prefix, "lm_head.")):
            return hf_key
        return self.bare_prefix + hf_key

    def is_expert_rows(self, module: str) -> bool:
        return any(_pattern_regex(p).match(module) for p in self.expert_rows)

    def is_ignored(self, hf_key: str) -> bool:
        return any(re.fullmatch(p, hf_key) for p in self.ignored)

    def is_conv1d(self, hf_module: str) -> bool:
        return any(_pattern_regex(p).match(hf_module) for p in self.conv1d)

    def is_either_layout(self, hf_module: str) -> bool:
        return any(_pattern_regex(p).match(hf_module) for p in self.either_layout)

    def module_to_ours(self, hf_module: str) -> str:
        for hf, ours in self.renames:
            if m := _pattern_regex(hf).match(hf_module):
                return self._relocate(_fill(ours, m))
        return self._relocate(hf_module)

    def module_to_hf(self, module: str) -> str:
        module = self._relocate(module, inverse=True)
        for hf, ours in self.renames:
            if m := _pattern_regex(ours).match(module):
                return _fill(hf, m)
        return module

    def stacked_for_hf(self, hf_module: str) -> tuple[str, int] | None:
        """(our stacked module, expert index) if `hf_module` is one expert's module."""
        for spec in self.stacked:
            if m := _pattern_regex(spec.hf_module).match(hf_module):
                return self._relocate(_fill(spec.module, m)), int(m.group("e"))
        return None

    def stacked_for_ours(self, module: str) -> str | None:
        """The HF module pattern (`{e}` left open) of one of our stacked modules."""
        module = self._relocate(module, inverse=True)
        for spec in self.stacked:
            if m := _pattern_regex(spec.module).match(module):
                return _fill(spec.hf_module, m)
        return None

    def tensor_to_ours(self, hf_name: str) -> str:
        for hf, ours in self.tensor_renames:
            if m := _pattern_regex(hf).match(hf_name):
                return _fill(ours, m)
        return hf_name

    def tensor_to_hf(self, name: str) -> str:
        for hf, ours in self.tensor_renames:
            if m := _pattern_regex(ours).match(name):
                return _fill(hf, m)
        return name

    def fused_for_hf(self, hf_module: str) -> tuple[Fused, list[str]] | None:
        """The fused spec that `hf_module` matches, with our part module paths."""
        for spec in self.fused:
            if m := _pattern_regex(spec.hf_module).match(hf_module):
                parent = self._relocate(_fill(spec.parent, m))
                return spec, [f"{parent}.{part}" for part in spec.parts]
        return None

    def fused_for_ours(self, module: str) -> tuple[Fused, str, list[str]] | None:
        """If `module` is one part of a fused HF module: (spec, HF module, all our parts)."""
        ours_parent, _, part = module.rpartition(".")
        parent = self._relocate(ours_parent, inverse=True)
        for spec in self.fused:
            if part in spec.parts and (m := _pattern_regex(spec.parent).match(parent)):
                return spec, _fill(spec.hf_module, m), [f"{ours_parent}.{p}" for p in spec.parts]
        return None


IDENTITY = WeightMap()
