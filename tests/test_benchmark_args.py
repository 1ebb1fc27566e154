"""The benchmarks refuse bad arguments before any work: exit code 2 and one line of
argparse's error on stderr naming the option, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, args, message", [
    ("bench_pool.py", ["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    ("bench_pool.py", ["--policies", "exact,paper9"], "--policies: unknown storage policy 'paper9'"),
    ("bench_pool.py", ["--policies", ","], "--policies: an empty list"),
    ("bench_bn.py", ["--batch", "x"], "argument --batch: expected a whole number, got 'x'"),
    ("bench_kernels.py", ["--sizes", "small,huge"], "--sizes: unknown huge; expected a comma list of small, large"),
    ("bench_engine.py", ["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    ("bench_engine.py", ["--policies", "--models", "resnet21"], "--models: unknown model 'resnet21'"),
    ("bench_memory.py", ["--repeats", "-1"], "argument --repeats: must be at least 0, got -1"),
    ("bench_conv.py", ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
])
def test_a_bad_argument_is_one_line_and_exit_2(script, args, message):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                       timeout=120, env=env, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert lines[-1].startswith(f"{script}: error: ") and message in lines[-1], lines
    assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), lines   # argparse's usage, then the error
