"""`benchmarks/run.py --quick` runs, passes its accuracy checks and reports gradient errors.

The peers (qpth, cvxpylayers) are optional: absent ones are skipped by the benchmark."""

import pathlib
import re
import subprocess
import sys

import pytest

RUN = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.mark.slow
def test_quick_benchmark_passes_and_reports_gradient_errors():
    proc = subprocess.run([sys.executable, str(RUN), "--quick"], capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "FD err" in output  # the per-case tables carry a gradient-error column
    worst = re.search(r"largest of ours vs central differences: (\S+)", output)
    assert worst is not None, output[-4000:]
    assert float(worst.group(1)) <= 1e-5
    assert "quick run: all accuracy checks passed" in output
