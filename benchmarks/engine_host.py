"""Host time per engine step, and how long the device waits for the host, with a stub device step.

The model's forward is replaced by a jitted stub of the same signature (next token = previous + 1),
so what is timed is the engine's own work: scheduling, preparing the step's arrays, dispatch,
sampling bookkeeping, appending tokens and building outputs. The parameter tree is a real one
(SmolLM2-135M's 30 layers, tiny hidden size), so flattening it costs what it costs.

    host_ms(batch)      = wall time per decode step with a trivial device step
    host_cpu_ms(batch)  = CPU time of the engine's thread per decode step (`time.thread_time`): what
                          the host work costs even when other jobs hold the cores (wall time on a
                          shared machine is mostly waiting for a core)

The device-idle figure needs a device that is busy without competing with the engine for a core or
for the GIL. On the CPU backend the stub step holds its computation for `--device-ms` in an XLA
custom call that sleeps in C (`benchmarks/stub_device.{cc,py}`): dispatch stays asynchronous, the
host thread runs on, and the op records each call's start and end itself (no Python runs on the
device side). At `--idle-batch` sequences, over the time from the first timed busy start to the
last timed end:

    idle fraction    = the gaps between one step's busy call ending and the next one's starting (the
                       sampler, the step's other device ops and XLA:CPU's hand-over between executions
                       run in those gaps too, so this is an upper bound)
    host wait        = the part of each gap before the host had dispatched the next step (its
                       dispatch returned after the busy call ended): the device held back by the host
    wall idle        = 1 - device_ms / (wall ms per step): the share read from the host's clock alone
                       (dispatch-to-ready against the known device time)
    device idle      = the share in which no XLA program ran at all, from a profiler trace of a further
                       run (`jax.profiler`, Python tracer off): the union of the intervals of every event
                       on XLA:CPU's own threads (each op's execution and each program's executor) over the
                       same span. This is the figure of the issue's target; the idle fraction above counts
                       the sampler and the step's other ops as idle.

A host callback that slept (the earlier stub) held the GIL when it started and ended and needed the
interpreter to run, so it measured the engine thread's contention more than the device's idleness.

    python -m benchmarks.engine_host [--batches 1 4 16 64 256] [--steps 50] [--device-ms 8]
    python -m benchmarks.engine_host --dry-run   # two small batches, a few steps
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

VOCAB = 512
LAYERS = 30  # SmolLM2-135M's depth: the parameter tree has its number of leaves
UNTIMED_STEPS = 4  # the prefill (one step at these sizes) and the first decode steps, before the timed ones


def build_model(layers: int = LAYERS):
    """A float32 Llama of SmolLM2-135M's depth with a tiny width (random weights, built from a config alone)."""
    import tempfile
    from pathlib import Path

    import transformers

    import model_lib
    from model_lib import load_config

    hf = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    raw = hf.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(raw))
        config, _ = load_config(folder, "float32")
    return model_lib.from_config(config)


def stub_forward(device_ms: float):
    """A forward of the model's signature doing trivial work: logits that make token t + 1 follow t.

    With `device_ms`, the step also holds the device that long (`stub_device.busy`).
    """
    from benchmarks import stub_device

    def forward(self, input_ids, batch, kv_caches=None, logits_indices=None):
        last = input_ids[logits_indices]
        if device_ms:
            last = stub_device.busy(last, device_ms)
        logits = jax.nn.one_hot((last + 1) % VOCAB, VOCAB, dtype=jnp.float32) * 10.0
        return logits, kv_caches

    return forward


def decode_seconds(engine, batch: int, steps: int, tag: str) -> tuple[float, float]:
    """(wall, engine-thread CPU) seconds of `steps` decode steps with `batch` sequences running (prefill not timed)."""
    from serving.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", [1 + (i % 100)] * 8, params)
    for _ in range(UNTIMED_STEPS):
        engine.step()
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        engine.step()
    seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu
    while engine.has_unfinished_requests():
        engine.step()
    return seconds, cpu


def idle_figures(engine, batch: int, steps: int, device_ms: float) -> dict:
    """The idle shares (module docstring) of `steps` decode steps at `batch`, the stub busy `device_ms` a step."""
    from benchmarks import stub_device

    run, dispatched = engine.runner.run, []

    def timed_run(inputs):
        logits = run(inputs)
        dispatched.append(time.perf_counter())
        return logits

    engine.runner.run = timed_run
    stub_device.reset()
    try:
        wall, _ = decode_seconds(engine, batch, steps, "idle")
    finally:
        del engine.runner.run
    timed = slice(UNTIMED_STEPS, UNTIMED_STEPS + steps)
    spans, dispatched = stub_device.spans()[timed], np.asarray(dispatched)[timed]
    total = spans[-1, 1] - spans[0, 0]
    gaps = np.maximum(spans[1:, 0] - spans[:-1, 1], 0.0)
    waits = np.minimum(np.maximum(dispatched[1:] - spans[:-1, 1], 0.0), gaps)
    step_ms = 1000 * wall / steps
    return {"batch": batch, "device_ms": device_ms, "step_ms": round(step_ms, 3),
            "idle_fraction": round(float(gaps.sum() / total), 4), "host_wait": round(float(waits.sum() / total), 4),
            "wall_idle": round(1 - device_ms / step_ms, 4)}


def busy_union(events: list[dict], steps: int) -> tuple[float, float]:
    """(span, busy) microseconds of the timed steps in a trace: from the first timed stub call's start to the last
    one's end, and how much of it some XLA thread spent executing (the union of their events' intervals)."""
    threads = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    complete = [e for e in events if e.get("ph") == "X" and e.get("dur", 0) > 0]
    stub = sorted((e["ts"], e["ts"] + e["dur"]) for e in complete if e["name"].startswith("ffi_call"))
    if len(stub) < UNTIMED_STEPS + steps:
        raise RuntimeError(f"the trace holds {len(stub)} stub device calls, expected at least {UNTIMED_STEPS + steps}")
    timed = stub[UNTIMED_STEPS: UNTIMED_STEPS + steps]
    start, end = timed[0][0], timed[-1][1]
    xla = sorted((e["ts"], e["ts"] + e["dur"]) for e in complete if threads.get(e["tid"], "").startswith("tf_XLA"))
    busy, reach = 0.0, start
    for lo, hi in xla:
        lo, hi = max(lo, reach), min(hi, end)
        if hi > lo:
            busy, reach = busy + hi - lo, hi
    return end - start, busy


def traced_device_idle(engine, batch: int, steps: int) -> float:
    """The device-idle share (module docstring) of `steps` decode steps at `batch`, from a profiler trace."""
    import gzip
    import tempfile
    from pathlib import Path

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # tracing every Python call would slow the host several times over
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True, profiler_options=options)
        try:
            decode_seconds(engine, batch, steps, "trace")
        finally:
            jax.profiler.stop_trace()
        [path] = Path(folder).rglob("perfetto_trace.json.gz")
        events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    span, busy = busy_union(events, steps)
    return 1 - busy / span


def make_engine(max_num_seqs: int, layers: int):
    """An engine for `max_num_seqs` sequences, its start-up heap frozen as `serve` freezes it (drop the previous
    engine first: the collection before the freeze then takes it)."""
    from serving.engine.engine import EngineConfig, LLMEngine
    from serving.engine.gc_heap import freeze_startup_heap

    config = dict(max_model_len=256, max_num_seqs=max_num_seqs, max_num_batched_tokens=max(max_num_seqs * 8, 64),
                  num_pages=max_num_seqs * 16 + 16, enable_prefix_caching=False)
    gc.unfreeze()  # what an earlier call froze may be collected again
    try:
        engine = LLMEngine(build_model(layers), None, EngineConfig(**config, enforce_eager=True))
    except TypeError:  # an engine without warm-up options
        engine = LLMEngine(build_model(layers), None, EngineConfig(**config))
    freeze_startup_heap()
    return engine


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3, help="runs per batch size; the one of least CPU time counts")
    p.add_argument("--device-ms", type=float, default=8.0, help="stub device time per step for the idle figure")
    p.add_argument("--idle-batch", type=int, default=256)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if args.dry_run:
        args.batches, args.steps, args.idle_batch, args.device_ms, args.repeats = [1, 4], 3, 4, 1.0, 1
    layers = 2 if args.dry_run else LAYERS

    from model_lib import CausalLM

    original = CausalLM.forward
    result: dict = {"jax": jax.__version__, "backend": jax.default_backend(), "steps": args.steps}
    try:
        CausalLM.forward = stub_forward(0.0)
        engine = make_engine(max(args.batches), layers)
        # Compiles the shapes used below: as many steps as a timed run, so that its sequences reach the same page
        # buckets (an engine without warm-up compiles a bucket on first use, inside the timed window otherwise).
        for b in args.batches:
            decode_seconds(engine, b, args.steps, f"warm{b}")
        # The best of --repeats runs: on a shared machine the other jobs only ever add time.
        timed = {b: min((decode_seconds(engine, b, args.steps, f"b{b}r{r}") for r in range(args.repeats)),
                        key=lambda t: t[1]) for b in args.batches}
        result["host_ms"] = {b: round(1000 * wall / args.steps, 3) for b, (wall, _) in timed.items()}
        result["host_cpu_ms"] = {b: round(1000 * cpu / args.steps, 3) for b, (_, cpu) in timed.items()}
        CausalLM.forward = stub_forward(args.device_ms)
        del engine
        engine = make_engine(args.idle_batch, layers)
        try:
            decode_seconds(engine, args.idle_batch, args.steps, "warm")
            result["idle"] = idle_figures(engine, args.idle_batch, args.steps, args.device_ms)
            result["idle"]["device_idle"] = round(traced_device_idle(engine, args.idle_batch, args.steps), 4)
        except RuntimeError as e:  # no C++ compiler, or not the CPU backend: host figures only
            result["idle"] = {"error": str(e)}
    finally:
        CausalLM.forward = original
        gc.unfreeze()  # the caller's process (a test) collects as before
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
