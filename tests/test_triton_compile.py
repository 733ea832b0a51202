"""Every Triton kernel compiles for sm_80 and sm_90 and fits their shared memory.

The interpreter that runs the other Triton tests here accepts code the compiler rejects and knows
no resource limits; tests/triton_compile_check.py compiles each kernel's real launches with
Triton's compiler, which needs no GPU. It runs in a child process: the interpreter, switched on
for this process by conftest.py, would replace the kernels.
"""

import os
import subprocess
import sys

import pytest

from fastseq import _backend

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not _backend.triton_importable(), reason="Triton is not installed")
def test_every_kernel_compiles_for_gpu_targets():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile_check.py")],
                           env=env, capture_output=True, text=True, timeout=1200)
    failed = [line for line in child.stdout.splitlines() if line.startswith("FAIL")]
    assert child.returncode == 0, "\n".join(failed) + child.stdout[-4000:] + child.stderr[-2000:]
    assert "0 failed" in child.stdout
