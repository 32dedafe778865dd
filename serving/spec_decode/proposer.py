"""The interface every speculative method implements: draft tokens for the sequences about to decode."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import jax

from serving.engine.input_batch import StepInputs
from serving.engine.scheduler import ScheduledSequence
from serving.engine.sequence import Sequence


@dataclass
class Proposal:
    """Drafts per sequence, and the distributions they were drawn from.

    `probs` None: every draft is a point mass (it was chosen, not drawn: n-gram). Otherwise `probs`
    [R, K, V] holds draft j's distribution of sequence `rows[seq]` at `probs[rows[seq], j]`.
    """

    drafts: dict[Sequence, list[int]] = field(default_factory=dict)
    probs: jax.Array | None = None
    rows: dict[Sequence, int] = field(default_factory=dict)


class Proposer(ABC):
    """One speculative method (n-gram, draft model, EAGLE-3, MTP)."""

    @abstractmethod
    def propose(self, wanted: dict[Sequence, int]) -> Proposal:
        """Up to `wanted[seq]` drafts to follow each sequence's known tokens (all read to the host)."""

    def release(self, seq: Sequence) -> None:
        """Forget a sequence that left the running batch (finished, aborted or preempted)."""

    def observe(self, scheduled: list[ScheduledSequence], inputs: StepInputs, hidden: jax.Array | None) -> None:
        """After a target step over `inputs` (its tokens read and rejected drafts rolled back): `hidden`, the
        step's captured hidden states `[T_pad, C]` when the method asked for them (`capture_hidden`)."""


class ViewProposer(Proposer):
    """A proposer that keeps a view per sequence (its draft state and pages in `self.pool`), made by
    `view_class(slot)` and dropped when the sequence leaves or changes slot (preemption)."""

    view_class: type
    pool: object
    views: dict

    def release(self, seq: Sequence) -> None:
        view = self.views.pop(seq, None)
        if view is not None:
            self.pool.release(view.pages)

    def _view(self, seq: Sequence):
        view = self.views.get(seq)
        if view is None or view.slot != seq.slot:
            self.release(seq)
            view = self.views[seq] = self.view_class(seq.slot)
        return view
