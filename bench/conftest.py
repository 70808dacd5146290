"""pytest configuration for `pytest bench/ --benchmark-only` (the pytest-benchmark view of the suite)."""
import os

import torch

# Without a GPU, fastkd's Triton kernels run only in Triton's interpreter; chosen at import, so set it here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)


def pytest_addoption(parser):
    # Without pytest-benchmark, `--benchmark-only` would be an unknown option and pytest would error out;
    # accept it so the benchmarks skip cleanly instead (test_benchmarks.py skips itself).
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        parser.addoption("--benchmark-only", action="store_true", help="(pytest-benchmark is not installed)")
