"""What one request may ask of the engine, and how long its context may be.

`SamplingParams` bounds each field on its own; these limits depend on the
engine (its vocabulary, `max_model_len`, and the operator's caps, named as
vLLM's flags where vLLM has one: `max_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass

from model_lib.config import ModelConfig
from serving.sampling_params import SamplingParams

SCALED_ROPE_KINDS = ("linear", "dynamic", "yarn")  # rope types whose `factor` stretches the positions


@dataclass(frozen=True)
class RequestLimits:
    """Caps on one request; the server exposes each as a `serve` flag."""

    max_n: int = 128  # completions per request (OpenAI's own cap on `n`); times the prompts of a batch
    max_logprobs: int = 20  # vLLM's default
    max_stop: int = 32  # stop strings, and separately stop token ids
    max_stop_len: int = 256  # characters in one stop string


def model_max_len(config: ModelConfig) -> int:
    """The longest context the model's positions cover (vLLM's derived max_model_len).

    Linear, dynamic and yarn rope scaling stretch the pretrained positions by
    `factor`; llama3 and longrope configs already name the stretched length.
    """
    length = config.max_position_embeddings
    rope = config.rope
    if rope is not None and rope.kind in SCALED_ROPE_KINDS and rope.factor > 1:
        base = rope.original_max_position if rope.kind == "yarn" and rope.original_max_position else length
        length = max(length, int(base * rope.factor))
    return length


def check_max_model_len(requested: int | None, config: ModelConfig, allow_long: bool) -> int:
    """The engine's max_model_len: `requested`, or the model's length; refuses one the model cannot cover."""
    limit = model_max_len(config)
    if requested is None:
        return config.max_position_embeddings
    if requested < 2:
        raise ValueError(f"max_model_len must be at least 2 (one prompt token and one generated), got {requested}")
    if requested > limit and not allow_long:
        raise ValueError(
            f"max_model_len={requested} is longer than the model's {limit} positions; "
            "pass allow_long_max_model_len (serve --allow-long-max-model-len) if the model extrapolates "
            "(e.g. rope scaling the config does not declare), at your own risk"
        )
    return requested


def validate_request(params: SamplingParams, limits: RequestLimits, vocab_size: int) -> None:
    """Raise ValueError, naming the limit, for parameters this engine will not serve."""
    max_logprobs = min(limits.max_logprobs, vocab_size)
    checks = [
        (params.n <= limits.max_n, f"n is {params.n}; at most {limits.max_n} completions per request (max_n)"),
        (params.logprobs is None or params.logprobs <= max_logprobs,
         f"logprobs is {params.logprobs}; at most {max_logprobs} (max_logprobs)"),
        (len(params.stop) <= limits.max_stop, f"{len(params.stop)} stop strings; at most {limits.max_stop} (max_stop)"),
        (all(len(s) <= limits.max_stop_len for s in params.stop),
         f"a stop string is longer than {limits.max_stop_len} characters (max_stop_len)"),
        (len(params.stop_token_ids) <= limits.max_stop,
         f"{len(params.stop_token_ids)} stop token ids; at most {limits.max_stop} (max_stop)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
