"""`benchmarks.offline_cpu` splits each implementation's run into prefill and decode steps from its timed rounds,
and the benchmarks' headers name the CPU model."""

from __future__ import annotations

import pytest


def test_prefill_and_step_are_medians_of_the_rounds():
    from benchmarks.offline_cpu import prefill_and_step

    # 32 output tokens: a whole run is the prefill plus 31 further steps
    rounds = [dict(ours=3.1 + 31 * 0.05, ours_prompt=3.1, hf=9.0, hf_prompt=1.0),
              dict(ours=1.0 + 31 * 0.02, ours_prompt=1.0, hf=9.0, hf_prompt=1.0),
              dict(ours=2.0 + 31 * 0.03, ours_prompt=2.0, hf=9.0, hf_prompt=1.0)]
    prefill, step_ms = prefill_and_step(rounds, "ours", 32)
    assert prefill == pytest.approx(2.0)
    assert step_ms == pytest.approx(30.0)
    assert prefill_and_step(rounds, "hf", 32) == pytest.approx((1.0, 8000 / 31))
    assert prefill_and_step(rounds, "hf", 1)[1] == pytest.approx(8000.0)  # one output token: no further step


def test_cpu_device_names_the_model_and_cores():
    import os

    from benchmarks.machine import cpu_device, cpu_model

    model = cpu_model()
    assert model and model in cpu_device()
    assert f"{os.cpu_count()} cores" in cpu_device()
