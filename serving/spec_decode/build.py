"""Build an engine's speculation from its `speculative_config` (None: plain decoding)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import jax
from flax import nnx

from model_lib import CausalLM
from model_lib.cache_spec import cache_specs, prefix_cacheable
from serving.spec_decode.config import SpeculativeConfig
from serving.spec_decode.draft_model import DraftModelProposer
from serving.spec_decode.hidden_draft import HiddenStateProposer
from serving.spec_decode.ngram import NgramProposer
from serving.spec_decode.step import SpeculativeStep

if TYPE_CHECKING:
    from serving.engine.engine import LLMEngine

logger = logging.getLogger(__name__)
HIDDEN_STATE_METHODS = ("eagle3", "mtp")  # drafts fed by the target's hidden states


def check_draft_vocab(draft: Any, target: Any, what: str = "vocabulary size") -> None:
    """The draft must speak the target's vocabulary: its drafts are target token ids."""
    if draft != target:
        raise ValueError(f"the draft model's {what} ({draft}) differs from the target's ({target}); "
                         "a draft model must share the target's tokenizer")


def speculative_step(engine: LLMEngine, value: SpeculativeConfig | dict | str | None,
                     draft_model: CausalLM | None) -> SpeculativeStep | None:
    config = SpeculativeConfig.parse(value)
    if config is None:
        if draft_model is not None:
            raise ValueError("a draft model was given without speculative_config method 'draft_model'")
        return None
    if jax.process_count() > 1:
        raise ValueError("speculative decoding runs in one process; multi-host engines do not support it yet")
    if engine.lora is not None:
        raise ValueError("speculative decoding does not run with LoRA adapters (enable_lora) yet")
    if engine.images is not None:
        raise ValueError("speculative decoding does not run on vision-language models yet")
    if not prefix_cacheable(cache_specs(engine.model_config)):
        raise ValueError(f"speculative decoding cannot roll back the recurrent state of {engine.model_config.architecture} "
                         "(rejected drafts would stay in it)")
    if config.method == "ngram":
        return SpeculativeStep(engine, config, NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max))
    if draft_model is None:
        raise ValueError(f"the {config.method} method needs its loaded draft (LLM builds it from 'model' or the target)")
    if config.method in HIDDEN_STATE_METHODS:
        return SpeculativeStep(engine, config, _hidden_state_proposer(engine, config, draft_model))
    check_draft_vocab(draft_model.config.vocab_size, engine.model_config.vocab_size)
    ec = engine.config
    proposer = DraftModelProposer(
        draft_model, num_pages=engine.pool.num_pages, page_size=ec.page_size, max_num_seqs=ec.max_num_seqs,
        max_num_batched_tokens=ec.max_num_batched_tokens, max_model_len=engine.max_model_len,
        num_speculative_tokens=config.num_speculative_tokens, scan_layers=ec.scan_layers,
    )
    return SpeculativeStep(engine, config, proposer)


def _hidden_state_proposer(engine: LLMEngine, config: SpeculativeConfig, draft: nnx.Module) -> HiddenStateProposer:
    """The target keeps the hidden states `draft` reads; prefix caching goes off (a cached prefix has none)."""
    layers = draft.capture_layers()
    if engine.runner.scan_layers and any(layer < engine.model_config.num_layers for layer in layers):
        raise ValueError(f"{config.method} reads the target's hidden states between layers {list(layers)}, which "
                         "scanned layers do not expose; serve with scan_layers=False")
    if engine.pool.enable_prefix_caching:
        logger.info("prefix caching is off: %s drafts need the target's hidden states of every prompt token",
                    config.method)
        engine.pool.enable_prefix_caching = False
    engine.runner.capture_hidden(layers)
    ec = engine.config
    return HiddenStateProposer(
        draft, num_pages=engine.pool.num_pages, page_size=ec.page_size, max_num_seqs=ec.max_num_seqs,
        max_num_batched_tokens=ec.max_num_batched_tokens, max_model_len=engine.max_model_len,
        num_speculative_tokens=config.num_speculative_tokens, min_token_bucket=engine.runner.min_token_bucket,
    )
