"""Reruns a test file's GPU cases in a process where cuBLASLt is switched off
(CORRAL_CUBLASLT_LIBRARY=none), so that Corral's own kernels serve the products cuBLASLt would."""

import os
import subprocess
import sys

import pytest

from corral import cuda_libs


def rerun_without_cublaslt(test_file: str, *pytest_args: str) -> None:
    """Runs pytest on test_file (with pytest_args) without cuBLASLt and asserts that it passed; skips
    when this process already runs without it."""
    if os.environ.get(cuda_libs.CUBLASLT_VARIABLE) == "none":
        pytest.skip("already running without cuBLASLt")
    env = dict(os.environ, **{cuda_libs.CUBLASLT_VARIABLE: "none"})
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, test_file],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
