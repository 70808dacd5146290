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


@pytest.fixture
def no_tf32():
    """Matrix products in true float32 on CUDA for the test (PyTorch's TF32 flag, restored afterwards)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
