"""`serve` with an injected device failure: a model step holding a prompt that starts with
FAULT_PROMPT raises, as a lost or crashed accelerator would (run as `python -m` with serve's flags)."""

from __future__ import annotations

import sys

from serving.engine.runner import ModelRunner
from serving.openai import cli

FAULT_PROMPT = [9, 9, 9, 9]
_execute = ModelRunner.execute


def _failing_execute(self, scheduled):
    if any(item.seq.prompt_ids[: len(FAULT_PROMPT)] == FAULT_PROMPT for item in scheduled):
        raise RuntimeError("injected device failure (XLA: device lost)")
    return _execute(self, scheduled)


if __name__ == "__main__":
    ModelRunner.execute = _failing_execute
    cli.main(sys.argv[1:])
