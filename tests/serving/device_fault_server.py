"""`serve` with an injected device failure: a model step holding a prompt that starts with
FAULT_PROMPT raises, as a lost or crashed accelerator would (run as `python -m` with serve's flags)."""

from __future__ import annotations

import sys

from serving.engine.runner import ModelRunner
from serving.openai import cli

FAULT_PROMPT = [9, 9, 9, 9]
_prepare, _run = ModelRunner.prepare, ModelRunner.run


def _marking_prepare(self, scheduled):
    """Prepare as usual, noting whether the step holds a faulty prompt (the device call then fails)."""
    self.fault_in_step = any(item.seq.prompt_ids[: len(FAULT_PROMPT)] == FAULT_PROMPT for item in scheduled)
    return _prepare(self, scheduled)


def _failing_run(self, inputs):
    if getattr(self, "fault_in_step", False):
        raise RuntimeError("injected device failure (XLA: device lost)")
    return _run(self, inputs)


if __name__ == "__main__":
    ModelRunner.prepare, ModelRunner.run = _marking_prepare, _failing_run
    cli.main(sys.argv[1:])
