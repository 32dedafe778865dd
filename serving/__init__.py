"""Serving: the decode engine, the offline `LLM` API (and, next, the OpenAI-compatible server)."""

from serving.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from serving.block_diffusion import BlockDiffusionParams
from serving.llm import LLM
from serving.lora import LoRARequest
from serving.outputs import CompletionOutput, Logprob, RequestOutput
from serving.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "BlockDiffusionParams", "CompletionOutput", "LLM",
           "LoRARequest", "Logprob", "RequestOutput", "RequestOutputKind", "SamplingParams"]
