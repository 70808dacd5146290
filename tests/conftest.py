import os

import pytest
import torch

# The tests run many tiny tensor ops; on a small, busy CPU a second intra-op thread only adds contention
# (seen here: 0.3 ms per call on one thread, tens of ms on two under load).
torch.set_num_threads(1)

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. It is chosen when the
# kernels are defined, so it must be set before fastkd.triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import BACKENDS, backend_device  # noqa: E402  (tests/ is on sys.path, see tests/helpers.py)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend in turn: "torch" (the reference, everywhere), "triton" (CUDA tensors, or CPU tensors in
    Triton's interpreter), "cuda" (the CUDA C++ extension, built just in time; needs a GPU). A backend that
    cannot run here is skipped with the reason. A test may parametrize `backend` itself (e.g. the kernel
    backends only): `device` follows it."""
    backend_device(request.param)
    return request.param


@pytest.fixture
def device(backend):
    """The device the test's tensors go on for `backend` (see helpers.backend_device)."""
    return backend_device(backend)


@pytest.fixture
def block_columns(monkeypatch):
    """Set the Triton row kernels' largest block of columns (`fastkd.triton.rows.MAX_BLOCK_V`) for the test, so
    that short rows run through several blocks of the online softmax. Nothing to set without Triton."""
    def set_block(columns):
        try:
            from fastkd.triton import rows
        except ImportError:
            return
        monkeypatch.setattr(rows, "MAX_BLOCK_V", columns)
    return set_block


@pytest.fixture
def small_blocks(block_columns):
    """Blocks of 16 columns, so a row of a few dozen runs through several blocks of the online softmax."""
    block_columns(16)


@pytest.fixture
def no_tf32():
    """Matrix products in true float32 on CUDA for the test (PyTorch's TF32 flag, restored afterwards)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
