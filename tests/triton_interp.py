"""Run a test file's ``interpreter`` tests in a fresh process with ``TRITON_INTERPRET=1``: Triton fixes
interpreter mode when a kernel module is imported, so it must be set before any import."""

from __future__ import annotations

import os
import subprocess
import sys


def run_interpreter_tests(test_file: str, timeout: float) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "interpreter"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
