"""Multi-host serving: the leader broadcasts every host->device call, followers replay them.

With `jax.distributed` (`model_lib/distributed.py`) every process holds the same engine
over one global mesh; its jitted computations contain collectives, so every process must
run the same computations, with the same host inputs, in the same order. Process 0, the
leader, owns the scheduler, the detokenizer and the outputs (and, under `serve`, the HTTP
server). Each engine method listed in `LLMEngine.DEVICE_CALLS` takes host values only
(step inputs, sampling-row updates, seeds, flags) into jitted computations; `Leader`
wraps those methods so that each call is first sent to every process with
`jax.experimental.multihost_utils.broadcast_one_to_all`, then run. A follower's `follow`
loop receives the calls and runs them on its own engine, whose device state (parameters,
KV caches, sampling slots, fed tokens) thus stays the same as the leader's. The leader
dispatches step N+1 before reading step N; followers never read, they only replay.

A message is the pickled call `(name, args, kwargs)` (numpy arrays and small dataclasses,
from process 0 of the same job): first its length, then its bytes padded to a power of two,
so the broadcast compiles for a handful of sizes only. `Leader.shutdown` sends `STOP`, which
ends the followers' loops (it also runs at the leader's exit).

Failures: nothing waits forever for a dead process. `jax.distributed`'s coordination service
(on process 0) notices a process that dies, at once when its connection drops or after it
misses its heartbeats (`heartbeat_timeout_seconds`, 100 s by default), and every surviving
process then aborts ("Terminating process because the JAX distributed service detected fatal
errors", exit status 134), so a supervisor sees the job end and restarts it. Checked by hand
on 2 CPU processes: killing the follower aborted an idle leader within 6 s, killing the leader
aborted the waiting follower at once.
"""

from __future__ import annotations

import atexit
import logging
import pickle
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from jax.experimental import multihost_utils

if TYPE_CHECKING:
    from serving.engine.engine import LLMEngine

logger = logging.getLogger(__name__)

STOP = "stop"
MIN_MESSAGE_BYTES = 256


def _padded_size(n: int) -> int:
    size = MIN_MESSAGE_BYTES
    while size < n:
        size *= 2
    return size


def send(message: Any) -> None:
    """Broadcast `message` from the leader (every follower is in `receive` at the same point)."""
    data = np.frombuffer(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    multihost_utils.broadcast_one_to_all(np.array([data.size], np.int32))
    padded = np.zeros(_padded_size(data.size), np.uint8)
    padded[: data.size] = data
    multihost_utils.broadcast_one_to_all(padded)


def receive() -> Any:
    """The message the leader sends next (a follower's side of `send`)."""
    size = int(multihost_utils.broadcast_one_to_all(np.zeros(1, np.int32))[0])
    data = multihost_utils.broadcast_one_to_all(np.zeros(_padded_size(size), np.uint8))
    return pickle.loads(np.asarray(data, np.uint8)[:size].tobytes())


def smallest(value: int) -> int:
    """The smallest of every process's `value` (sizes that each process derives from its own device)."""
    return int(np.min(multihost_utils.process_allgather(np.array(value, np.int64))))


class Leader:
    """Makes `engine`'s device calls broadcast themselves before they run (process 0)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.stopped = False
        for name in engine.DEVICE_CALLS:
            setattr(engine, name, self._broadcasting(name, getattr(engine, name)))
        atexit.register(self.shutdown)

    def _broadcasting(self, name: str, run: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.stopped:
                raise RuntimeError("the followers were shut down; this engine can no longer run steps")
            send((name, args, kwargs))
            return run(*args, **kwargs)

        return call

    def shutdown(self) -> None:
        """Tell the followers to stop (idempotent); the engine can run no step afterwards."""
        if self.stopped:
            return
        self.stopped = True
        try:
            send(STOP)
        except Exception:  # noqa: BLE001 - a broken job: jax.distributed's health checking ends the followers
            logger.exception("multi-host: could not tell the followers to stop")
            return
        logger.info("multi-host: the followers were told to stop")


def follow(engine: LLMEngine) -> int:
    """Replay the leader's device calls on `engine` until the leader stops; returns how many ran."""
    calls = 0
    while (message := receive()) != STOP:
        name, args, kwargs = message
        if name not in engine.DEVICE_CALLS:
            raise RuntimeError(f"the leader sent an unknown device call {name!r}")
        getattr(engine, name)(*args, **kwargs)
        calls += 1
    logger.info("multi-host: the leader stopped after %d device calls", calls)
    return calls
