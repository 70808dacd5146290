"""dkd_loss (decoupled KD, mdistiller's) on every backend: forward, student and teacher gradients.

Each test takes the `backend` fixture (tests/conftest.py): "torch" (the reference), "triton" (CUDA tensors, or
without a GPU CPU tensors in Triton's interpreter: small shapes) and "cuda" (the CUDA C++ extension, GPU only).
A kernel backend is compared with the reference on the same inputs; the reference itself with the reference
in float64 on the same values, at the same tolerances.
"""
import pytest
import torch
from helpers import (all_finite, assert_error_within_twice_reference, assert_logits_on_gpu, assert_matches_reference,
                     compile_fullgraph, eager_and_compiled, gpu_logit_sizes, kernels_only, logits, loss_and_grads,
                     on_gpu_kernels, targets)

from fastkd import functional as KF
from fastkd import reference


def dkd(target, alpha=1.0, beta=8.0, temperature=4.0):
    return lambda s, t, backend: KF.dkd_loss(s, t, target, alpha=alpha, beta=beta, temperature=temperature,
                                             backend=backend)


def check(fn, s, t, backend, requires_grad=None):
    """The comparison with the reference, NaN equal to NaN."""
    return assert_matches_reference(fn, s, t, backend=backend, requires_grad=requires_grad, equal_nan=True)


@pytest.mark.parametrize("V", [1, 7, 100, 1037])
def test_dkd_matches_reference(backend, device, V):
    s = logits(5, V, seed=V, device=device)
    t = logits(5, V, seed=V + 100, device=device)
    check(dkd(targets(5, V, device, seed=V)), s, t, backend)


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 0.5, 1.0), (0.0, 2.0, 2.0),
                                                    (1.0, 0.0, 3.0)])
def test_dkd_weights_and_temperature(backend, device, alpha, beta, temperature):
    s = logits(4, 33, seed=21, device=device)
    t = logits(4, 33, seed=22, device=device)
    check(dkd(targets(4, 33, device), alpha, beta, temperature), s, t, backend)


def test_dkd_streams_over_blocks(backend, device, block_columns):
    block_columns(64)
    s = logits(4, 300, seed=23, device=device)
    t = logits(4, 300, seed=24, device=device)
    target = torch.tensor([0, 63, 64, 299], device=device)  # first, block edges, last
    check(dkd(target, temperature=2.0), s, t, backend)


def test_dkd_one_row(backend, device):
    s = logits(1, 50, seed=25, device=device)
    t = logits(1, 50, seed=26, device=device)
    check(dkd(torch.tensor([17], device=device)), s, t, backend)


def test_dkd_strided_rows(backend, device):
    s = logits(5, 40, seed=27, device=device)[:, 2:-1]      # row stride 40
    t = logits(37, 5, seed=28, device=device).t()           # column stride 5
    assert not s.is_contiguous() and not t.is_contiguous()
    check(dkd(targets(5, 37, device)), s, t, backend)


def test_dkd_neg_inf_columns_in_both(backend, device):
    s = logits(4, 30, seed=29, device=device)
    t = logits(4, 30, seed=30, device=device)
    target = torch.tensor([0, 7, 12, 3], device=device)
    s[:, [0, 7, 29]] = float("-inf")  # the target column of rows 0 and 1 too
    t[:, [0, 7, 29]] = float("-inf")
    loss, d_s, d_t = check(dkd(target), s, t, backend)
    assert all_finite(loss, d_s, d_t)


def test_dkd_neg_inf_columns_teacher_only(backend, device):
    s = logits(4, 30, seed=31, device=device)
    t = logits(4, 30, seed=32, device=device)
    target = torch.tensor([3, 7, 12, 20], device=device)
    t[:, [3, 4, 20]] = float("-inf")  # the target column of rows 0 and 3 too
    loss, d_s, d_t = check(dkd(target), s, t, backend)
    assert all_finite(loss, d_s, d_t)


@pytest.mark.parametrize("V", [1, 2, 50])
def test_dkd_identical_rows_are_exactly_zero(backend, device, V):
    if backend == "torch" and V > 1:
        pytest.skip("the reference's gradient there is rounding noise (~1e-8), not exactly 0: a kernel property")
    s = logits(3, V, seed=33, device=device)
    fn = dkd(targets(3, V, device))
    loss, d_s, d_t = loss_and_grads(lambda s, t: fn(s, t, backend), s, s.clone())
    assert loss.item() == 0.0
    assert not d_s.any() and not d_t.any()


def test_dkd_gradient_only_where_required(backend, device):
    s = logits(3, 20, seed=34, device=device)
    t = logits(3, 20, seed=35, device=device)
    fn = dkd(targets(3, 20, device))
    check(fn, s, t, backend, requires_grad=(True, False))
    check(fn, s, t, backend, requires_grad=(False, True))


@pytest.mark.parametrize("column", ["target", "other"])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_dkd_nan_anywhere_in_a_row_gives_nan(backend, device, column, side):
    # The zero-mass guards (no non-target teacher mass, a zero binary probability) must not hide a NaN.
    s, t = logits(3, 9, seed=41, device=device), logits(3, 9, seed=42, device=device)
    target = torch.tensor([2, 4, 8], device=device)
    (s if side == "student" else t)[1, 4 if column == "target" else 6] = float("nan")
    loss = KF.dkd_loss(s, t, target, backend=backend)
    assert torch.isnan(loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_is_no_worse_than_torch(backend, device, dtype):
    """The kernels' error against float64 is at most about that of the reference in the input dtype."""
    kernels_only(backend)
    s = logits(4, 300, seed=38, device=device, dtype=dtype)
    t = logits(4, 300, seed=39, device=device, dtype=dtype)
    assert_error_within_twice_reference(dkd(targets(4, 300, device)), s, t, backend, device, 1e-6, 1e-12)


def test_float64_falls_back_to_the_reference(backend, device):
    s = logits(3, 11, seed=49, device=device, dtype=torch.float64)
    t = logits(3, 11, seed=50, device=device, dtype=torch.float64)
    y = targets(3, 11, device)
    assert torch.equal(KF.dkd_loss(s, t, y, backend=backend), reference.dkd_loss(s, t, y))


@eager_and_compiled
def test_eager_and_compiled(backend, device, compiled):
    """Eager: against the reference. Compiled (torch.compile(fullgraph=True): one graph, forward and backward):
    the eager numbers of the same backend."""
    s = logits(6, 10, seed=47, device=device)
    t = logits(6, 10, seed=48, device=device)
    y = torch.tensor([1, 2, -100, 3, 0, 9], device=device).clamp(min=0)
    if not compiled:
        check(lambda s, t, b: KF.dkd_loss(s, t, y, backend=b), s, t, backend)
        return
    eager = lambda s, t: KF.dkd_loss(s, t, y, backend=backend)  # noqa: E731
    got = loss_and_grads(compile_fullgraph(eager), s, t)
    for g, e in zip(got, loss_and_grads(eager, s, t)):
        torch.testing.assert_close(g, e)


# --- GPU only: larger shapes, the two kernel backends ----------------------------------------------------------

def dkd_arange(s, t, b):
    return KF.dkd_loss(s, t, torch.arange(s.shape[0], device="cuda") % s.shape[-1], backend=b)


@on_gpu_kernels
@gpu_logit_sizes
def test_dkd_on_gpu(backend, device, size):
    assert_logits_on_gpu(dkd_arange, backend, device, size)
