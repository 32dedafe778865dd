"""`benchmarks/gpu_check.sh --dry-run`: the GPU machine's one script, every part on tiny shapes here."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path)}
    env.pop("OUT", None)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1200)
    report = (tmp_path / "gpu_check.md").read_text()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for part in ("pytest_gpu", "paged_attention", "grouped_matmul", "engine", "spec_decode"):
        assert f"### {part}: ok" in report, report
    for table in ("| batch | context | ours GB/s", "| prefill batch |", "| config | tokens |", "| model | params GiB |",
                  "| method | batch | decode tok/s |"):
        assert table in report, report
    assert "skipped" in report  # the gpu-marked tests were collected (and skip without a GPU)
