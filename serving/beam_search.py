"""Beam search over the engine, as vLLM's `LLM.beam_search` runs it (`BeamSearchParams`, `BeamSearchOutput`).

A beam's tokens are what the decoder reads: the prompt and its output on a decoder-only model; the decoder
prompt (`decoder_start_token_id`, a forced BOS) and the output on an encoder-decoder, whose every round
runs the encoder again for each beam (no cross K/V is shared between requests yet). `forced_eos_token_id`
is not applied (vLLM's beam search has no logits processors).

Every round asks the engine for one token of every live beam with its top `2 * beam_width` logprobs (one
batch; with prefix caching each beam's prefix comes from the cache, so a round prefills about a page per
beam), expands each beam by those tokens, moves candidates that end in EOS to the finished list (unless
`ignore_eos`) and keeps the `beam_width` best of the rest. After `max_tokens` rounds (or when no beam is
left) the live beams join the finished ones, and the `beam_width` best by
`cum_logprob / len(tokens) ** length_penalty` (tokens: prompt and output; EOS not counted) come back.
Without EOS this is the standard beam search of transformers' `generate(num_beams=...)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from serving.outputs import Logprob, RequestOutput
from serving.sampling_params import INT32_MAX, SamplingParams


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def validate(self, max_logprobs: int) -> None:
        """ValueError naming the bound (a round asks for 2 * beam_width logprobs)."""
        if not 1 <= self.beam_width <= max_logprobs // 2:
            raise ValueError(f"beam_width must be in [1, {max_logprobs // 2}] (2 x beam_width logprobs per token, "
                             f"max_logprobs {max_logprobs}), got {self.beam_width}")
        if not 1 <= self.max_tokens <= INT32_MAX:
            raise ValueError(f"max_tokens must be in [1, {INT32_MAX}], got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not -10.0 <= self.length_penalty <= 10.0:
            raise ValueError(f"length_penalty must be in [-10, 10], got {self.length_penalty}")


@dataclass
class BeamSearchSequence:
    """A beam: its tokens (prompt and output), the logprobs of its outputs, their sum and (once done) its text."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]


def beam_score(beam: BeamSearchSequence, eos_token_ids: tuple[int, ...], length_penalty: float) -> float:
    """vLLM's ranking: cum_logprob / len ** length_penalty, a final EOS not counted."""
    length = len(beam.tokens) - (1 if beam.tokens and beam.tokens[-1] in eos_token_ids else 0)
    return beam.cum_logprob / (max(length, 1) ** length_penalty)


class BeamSearch:
    """One search's state: `next_round()` gives the beams to run (prompt index, tokens), `advance(outputs)` takes
    their one-token outputs in that order, `results()` ranks the beams when no round is left."""

    def __init__(self, prompts: list[list[int]], params: BeamSearchParams, eos_token_ids: tuple[int, ...],
                 max_model_len: int):
        self.params, self.eos_token_ids, self.max_model_len = params, eos_token_ids, max_model_len
        self.step = SamplingParams(max_tokens=1, logprobs=2 * params.beam_width, temperature=params.temperature)
        self.live = [[BeamSearchSequence(list(p))] for p in prompts]
        self.done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        self.rounds = 0

    def key(self, beam: BeamSearchSequence) -> float:
        return beam_score(beam, self.eos_token_ids, self.params.length_penalty)

    def next_round(self) -> list[tuple[int, list[int]]]:
        """The beams to run next (empty: the search is over); beams that fill the context end here."""
        if self.rounds >= self.params.max_tokens:
            return []
        for i, group in enumerate(self.live):
            self.done[i] += [dataclasses.replace(b, finish_reason="length") for b in group
                             if len(b.tokens) >= self.max_model_len]
            self.live[i] = [b for b in group if len(b.tokens) < self.max_model_len]
        return [(i, beam.tokens) for i, group in enumerate(self.live) for beam in group]

    def advance(self, outputs: list[RequestOutput]) -> None:
        """Grow every beam of the round by its candidates; keep the `beam_width` best live ones per prompt."""
        self.rounds += 1
        outputs = iter(outputs)
        for i, group in enumerate(self.live):
            candidates = []
            for beam in group:
                out = next(outputs).outputs[0]
                for token, logprob in out.logprobs[0].items():
                    grown = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [out.logprobs[0]],
                                               beam.cum_logprob + logprob.logprob)
                    if token in self.eos_token_ids and not self.params.ignore_eos:
                        self.done[i].append(dataclasses.replace(grown, finish_reason="stop"))
                    else:
                        candidates.append(grown)
            self.live[i] = sorted(candidates, key=self.key, reverse=True)[: self.params.beam_width]

    def results(self, decode: Callable[[list[int]], str] | None = None) -> list[BeamSearchOutput]:
        results = []
        for group, finished in zip(self.live, self.done):
            ended = [dataclasses.replace(b, finish_reason=b.finish_reason or "length") for b in group]
            best = sorted(finished + ended, key=self.key, reverse=True)[: self.params.beam_width]
            if decode is not None:
                for beam in best:
                    beam.text = decode(beam.tokens)
            results.append(BeamSearchOutput(best))
        return results


def beam_search(
    prompts: list[list[int]],
    params: BeamSearchParams,
    run: Callable[[list[tuple[int, list[int]]], SamplingParams], list[RequestOutput]],
    eos_token_ids: tuple[int, ...],
    max_model_len: int,
    decode: Callable[[list[int]], str] | None = None,
) -> list[BeamSearchOutput]:
    """Beams for every prompt; `run([(prompt index, beam tokens)], params)` generates one batch through the
    engine. A beam that fills `max_model_len` ends there ("length")."""
    search = BeamSearch(prompts, params, eos_token_ids, max_model_len)
    while beams := search.next_round():
        search.advance(run(beams, search.step))
    return search.results(decode)
