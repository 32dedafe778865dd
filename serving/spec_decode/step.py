"""The engine step with speculation: propose, schedule, verify every draft in one target step, read.

Speculative steps run synchronously: proposing needs every token of a sequence on the host, so
a step reads its results before the next is scheduled (vLLM also ran speculation without async
scheduling at first). Per step:

1. the proposer drafts up to k tokens for each running sequence that is decoding (capped so the
   run never passes max_tokens) and they become its `spec_tokens`;
2. the scheduler gives each sequence its missing token plus its drafts (drafts that do not fit
   the token budget are dropped; prefill chunks and joining sequences carry none);
3. one ragged target step computes KV for all of them and logits for the last k + 1 positions of
   each sequence; `verify` accepts a prefix of the drafts and adds the target's own token;
4. the accepted tokens are appended one by one (stop tokens, stop strings, EOS and max_tokens end
   the run early, logprobs come per token), the KV of rejected drafts is rolled back (progress and
   pages) and only pages of kept tokens are registered in the prefix cache.

Structured output: a constrained sequence's matcher walks its drafts when they are proposed
(`StepMasks.draft_rows`), which cuts them at the first draft the grammar rejects and gives one
bitmask row per verified position; `verify` applies the rows before its acceptance test, and the
matcher then advances by the kept tokens only (as they are appended). Free rows stay all ones.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import numpy as np

from serving.engine.scheduler import ScheduledSequence
from serving.engine.sequence import Sequence, Status
from serving.outputs import RequestOutput
from serving.spec_decode.config import SpeculativeConfig
from serving.spec_decode.proposer import Proposal, Proposer
from serving.spec_decode.stats import SpecDecodeStats
from serving.spec_decode.verify import verify

if TYPE_CHECKING:
    from serving.engine.engine import LLMEngine


class SpeculativeStep:
    def __init__(self, engine: LLMEngine, config: SpeculativeConfig, proposer: Proposer):
        self.engine, self.config, self.proposer = engine, config, proposer
        self.k = config.num_speculative_tokens
        self.stats = SpecDecodeStats(self.k)
        self.num_steps = 0  # target steps run
        self._drafting: set[Sequence] = set()  # sequences the proposer may hold state for
        self._draft_masks: dict[Sequence, np.ndarray] = {}  # grammar rows of this step's drafts

    def step(self) -> list[RequestOutput]:
        engine = self.engine
        failed: dict[str, RequestOutput] = {}
        proposal = self._propose(failed)
        scheduled = engine.scheduler.schedule()
        engine._write_joined_rows(failed)
        grammar_rows = self._grammar_rows(scheduled, failed)
        if failed:
            scheduled = [item for item in scheduled if not item.seq.finished]
        if not scheduled:
            return list(failed.values())
        # The device part: an exception here leaves step() (the engine cannot go on).
        completes, sampled, num_accepted, inputs = self._run(scheduled, proposal, grammar_rows)
        tokens = sampled["tokens"].tolist()
        width = self.k + 1
        touched = {}
        for i, (item, done) in enumerate(zip(scheduled, completes)):
            seq = item.seq
            drafts, seq.spec_tokens = seq.spec_tokens, []
            if not done:
                continue
            accepted = int(num_accepted[i])
            self.stats.record(len(drafts), accepted)
            engine._take_tokens(seq, tokens[i * width : i * width + accepted + 1], sampled, i * width, touched, failed)
        self.proposer.observe(scheduled, inputs, engine.runner.hidden)
        return engine._outputs(touched, failed) + list(failed.values())

    def _propose(self, failed: dict[str, RequestOutput]) -> Proposal:
        """Drafts for the running sequences that decode next, set as their `spec_tokens` (cut where a
        grammar rejects one)."""
        running = self.engine.scheduler.running
        for seq in self._drafting - running.keys():
            self.proposer.release(seq)  # finished, aborted or preempted
        wanted = {}
        for seq in running:
            seq.spec_tokens = []  # drafts of a step that did not schedule it are stale
            room = seq.max_tokens - len(seq.output_ids) - 1  # the target adds one token of its own
            if seq.status is Status.RUNNING and seq.num_computed == seq.num_tokens - 1 and room > 0:
                wanted[seq] = min(self.k, room)
        self._drafting = set(running)
        proposal = self.proposer.propose(wanted) if wanted else Proposal()
        self._draft_masks = {}
        for seq, drafts in proposal.drafts.items():
            seq.spec_tokens = list(drafts)
            if seq.matcher is None or not drafts:
                continue
            try:
                rows, num = self.engine.masks.draft_rows(seq.matcher, seq.spec_tokens, proposal.probs is not None)
            except Exception as e:  # noqa: BLE001 - fails this request only
                self.engine._fail(seq.request_id, "walking its grammar through the drafts", e, failed)
                continue
            del seq.spec_tokens[num:]
            self._draft_masks[seq] = rows
        return proposal

    def _grammar_rows(self, scheduled: list[ScheduledSequence], failed: dict[str, RequestOutput]) -> dict[Sequence, np.ndarray]:
        """The bitmask rows [num drafts + 1, W] of each constrained sequence this step samples."""
        rows = {}
        for item in scheduled:
            seq = item.seq
            if seq.matcher is None or not item.completes_sequence or seq.finished:
                continue
            walked = self._draft_masks.get(seq)
            if walked is not None:  # the scheduler may have cut the drafts further
                rows[seq] = walked[: len(seq.spec_tokens) + 1]
                continue
            try:
                rows[seq] = self.engine.masks.row(seq.matcher)[None]
            except Exception as e:  # noqa: BLE001 - fails this request only
                self.engine._fail(seq.request_id, "building its grammar mask", e, failed)
        return rows

    def _run(self, scheduled: list[ScheduledSequence], proposal: Proposal, grammar_rows: dict[Sequence, np.ndarray]):
        """The target step and the verifier; (completes per sequence, host samples, accepted counts, step inputs).

        `grammar_rows`: the mask rows of the constrained sequences (`_grammar_rows`)."""
        engine, width = self.engine, self.k + 1
        completes = [item.completes_sequence for item in scheduled]
        inputs = engine.runner.prepare(scheduled)
        rows = inputs.logits_indices.shape[0]
        drafts = np.zeros((rows, self.k), np.int32)
        num_drafts = np.zeros(rows, np.int32)
        draft_rows = np.zeros(rows, np.int32)
        for i, item in enumerate(scheduled):
            spec = item.seq.spec_tokens
            drafts[i, : len(spec)] = spec
            num_drafts[i] = len(spec)
            draft_rows[i] = proposal.rows.get(item.seq, 0)
        # Sequence i's rows: its last num_drafts + 1 tokens, then repeats of its last (unused).
        offsets = np.minimum(np.arange(width)[None, :] - num_drafts[:, None], 0)
        logits_indices = np.maximum(inputs.logits_indices[:, None] + offsets, 0).reshape(-1)
        inputs = dataclasses.replace(inputs, logits_indices=logits_indices)
        slots = np.full(rows, engine.config.max_num_seqs, np.int32)
        slots[: len(scheduled)] = [item.seq.slot for item in scheduled]
        mask = np.zeros(rows, bool)
        mask[: len(scheduled)] = completes
        seqs = [item.seq for item, done in zip(scheduled, completes) if done]
        wants_logprobs = any(s.params.logprobs is not None for s in seqs)
        bitmask = engine.masks.step({i * width + j: row for i, item in enumerate(scheduled)
                                     for j, row in enumerate(grammar_rows.get(item.seq, ()))}, rows * width)
        if bitmask is None:
            bitmask = engine.masks.all_allowed(rows * width)
        logits = engine.runner.run(inputs)
        self.num_steps += 1
        sampled, num_accepted, engine.slot_state, engine.runner.fed_tokens = verify(
            logits, engine.slot_state, engine.runner.fed_tokens, slots, mask, drafts, num_drafts,
            proposal.probs if any(num_drafts) else None, draft_rows, bitmask,
            num_logprobs=engine.max_logprobs if wants_logprobs else None,
            use_penalties=any(s.params.uses_penalties for s in seqs),
        )
        engine.scheduler.update_after_step(scheduled)
        fields = {f.name: getattr(sampled, f.name) for f in dataclasses.fields(sampled)}
        fields["num_accepted"] = num_accepted
        host = {k: np.asarray(v) for k, v in jax.device_get(fields).items() if v is not None}
        return completes, host, host.pop("num_accepted"), inputs
